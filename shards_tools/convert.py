"""``convert-legacy``: the original tool's output JSONL + ``.pt`` embeddings → shards (``reshard`` is its own module).

The original extraction writes ``{--output_jsonl_dir}/{stem}_rank_{rank:03d}.jsonl``:
each line is the input row (``source_image``, ``edit_image``, instructions) plus
``source_image_size``/``edit_image_size`` and ``embeddings_tensor_{en,cn,droptext,
en_inv,cn_inv,droptext_inv}``: paths of ``.pt`` files under ``--embeddings_save_dir``
as its command line gave them, so often relative to the folder it ran in.  Its
training reads a meta folder whose sub-folders are tasks.  Text-to-image lines
(``--t2i_mode``) carry only ``en``/``cn``; their dropped text used an empty-prompt
embedding file shipped with that tool, which becomes the task's null embedding.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from tqdm import tqdm

from pipeline import families
from pipeline.common import images as imaging
from pipeline.common.flags import (
    DEFAULT_SHARD_SAMPLES,
    NO_TRAIN_COPIES,
    positive_int,
    shard_size_help,
    train_copy_size_help,
)
from pipeline.common.options import Checked, at_least, option
from pipeline.common.records import RecordError, iter_lines, parse_line, resolve_ref
from pipeline.errors import UserError
from pipeline.extract.prepare import sample_from_images
from pipeline.families.qwen_edit.prompts import REAL_DROP_INDEX
from pipeline.shards.format import (
    embedding_to_npy,
    new_manifest,
    npy_to_embedding,
    sample_key,
)
from pipeline.shards.reader import iter_samples
from pipeline.shards.storage import Store, has_scheme, join, options_for, uri_exists
from pipeline.shards.writer import Failure, PreparedSample
from shards_tools.writer import TaskWriter

log = logging.getLogger("shards_tools")

LEGACY_FAMILY = "qwen_edit"  # the original tool knew Qwen-Image-Edit-2509 only
# the original tool's line fields → our variant names
LEGACY_FIELDS = {
    "embeddings_tensor_en": "en",
    "embeddings_tensor_cn": "cn",
    "embeddings_tensor_droptext": "drop",
    "embeddings_tensor_en_inv": "en_inv",
    "embeddings_tensor_cn_inv": "cn_inv",
    "embeddings_tensor_droptext_inv": "drop_inv",
}
LAYOUTS = ("auto", "task", "meta")
FAILURE_FIELDS = ("file", "line", "kind", "reason", "field", "text")
# names of per-rank sub-folders (rank0, rank_001, 3): a folder of those is one task, not a meta folder
_RANK_FOLDER = re.compile(r"^(rank)?[_-]?\d+$", re.IGNORECASE)


class ConversionRefused(UserError):
    """A task that must not be converted as it is (the message says how to fix it)."""


def parse_path_map(text: str) -> tuple[str, str]:
    """``--path_map OLD=NEW`` → (old prefix, new prefix)."""
    old, sep, new = text.partition("=")
    if not sep or not old:
        raise UserError(f"--path_map expects OLD_PREFIX=NEW_PREFIX, got {text!r}")
    return old, new


@dataclass
class ConvertOptions(Checked):
    """How convert-legacy writes a task (the flags are these fields, ``python -m shards_tools convert-legacy``)."""

    max_samples_per_shard: int = option(
        DEFAULT_SHARD_SAMPLES, shard_size_help(DEFAULT_SHARD_SAMPLES), flag_type=positive_int, check=at_least(1)
    )
    null_embedding: str | None = option(
        None,
        "the empty-prompt (T2I template) embedding file the original tool ships (.pt, loaded with "
        "weights_only=True, or .npy): the null embedding of tasks with text-to-image lines",
    )
    model_path: str | None = option(
        None,
        "Qwen-Image-Edit(-2509) folder: compute the null embedding with our encoder when a task needs one "
        "and --null_embedding is not given; also recorded as the tasks' encoder",
    )
    path_map: list[tuple[str, str]] = option(
        [],
        "rewrite paths starting with OLD to start with NEW (files moved since extraction); repeatable",
        append=True,
        metavar="OLD=NEW",
        convert=lambda values, args=None: [parse_path_map(text) for text in values or []],
    )
    train_copy_size: int = option(NO_TRAIN_COPIES, train_copy_size_help())


@dataclass
class LegacyTask:
    """One task of the original layout: its folder and its output JSONLs (relative to the folder)."""

    name: str
    root: str
    jsonls: list[str]


def load_pt_tensor(uri: str, storage_options: dict | None) -> torch.Tensor:
    """A ``.pt`` embedding, loaded with ``weights_only=True``; ``[1, seq, hidden]`` is squeezed."""
    with fsspec.open(uri, "rb", **options_for(uri, storage_options)) as handle:
        value = torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
    if isinstance(value, dict):  # {"prompt_embeds": tensor, ...} style files
        value = next(v for v in value.values() if torch.is_tensor(v))
    return _as_2d(value)


def load_embedding_file(uri: str, storage_options: dict | None) -> torch.Tensor:
    """A ``.pt`` (``weights_only``) or ``.npy`` (``allow_pickle=False``; ours or plain floats) embedding."""
    if not uri.endswith(".npy"):
        return load_pt_tensor(uri, storage_options)
    with fsspec.open(uri, "rb", **options_for(uri, storage_options)) as handle:
        data = handle.read()
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype == np.uint16:  # our bfloat16 bit pattern, [seq, hidden] or [1, seq, hidden]
        return _as_2d(torch.from_numpy(array.astype(np.int16)).view(torch.bfloat16))
    return _as_2d(torch.from_numpy(np.ascontiguousarray(array)))


def _as_2d(value: Any) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise ValueError(f"expected a tensor, got {type(value).__name__}")
    if value.dim() == 3 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 2:
        raise ValueError(f"expected a [seq, hidden] tensor, got shape {tuple(value.shape)}")
    return value


# ---- finding the original layout ---------------------------------------------------------------


def _rel(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p)


def _jsonls(store: Store, rel: str = "", depth: int = 3) -> list[str]:
    """JSONL files (paths under ``rel``) at the shallowest of ``depth`` folder levels that has any.

    Level by level, so the original's ``out_jsonl/`` (or its per-rank sub-folders)
    is found without listing deeper folders of embeddings.
    """
    level = [""]
    for _ in range(depth):
        found, deeper = [], []
        for folder in level:
            subfolders, files = store.folders_and_files(_rel(rel, folder))
            found += [_rel(folder, f) for f in files if f.endswith(".jsonl")]
            deeper += [_rel(folder, sub) for sub in subfolders]
        if found:
            return found
        level = deeper
    return []


def find_legacy_tasks(
    root: str, storage_options: dict | None, layout: str, task_name: str
) -> tuple[str, list[LegacyTask]]:
    """(the layout used, its tasks): ``task``: ``root`` is one output JSONL folder; ``meta``: each sub-folder is one.

    ``auto`` picks ``task`` when ``root`` holds JSONLs, or only per-rank sub-folders
    (``rank0``, ``003``) do; ``meta`` otherwise.
    """
    store = Store(root, storage_options)
    folders, files = store.folders_and_files("")
    if not folders and not files:
        raise UserError(f"{root}: no such folder, or it is empty")
    if layout == "auto":
        with_jsonl = [f for f in folders if any(n.endswith(".jsonl") for n in store.folders_and_files(f)[1])]
        top = any(f.endswith(".jsonl") for f in files)
        layout = "task" if top or (with_jsonl and all(_RANK_FOLDER.match(f) for f in with_jsonl)) else "meta"
    if layout == "task":
        tasks = [LegacyTask(task_name, root, _jsonls(store))]
    else:
        tasks = [LegacyTask(folder, join(root, folder), _jsonls(store, folder)) for folder in folders]
        for task in tasks:
            if not task.jsonls:
                log.info("%s: no *.jsonl in it or its sub-folders; not a task, skipped", task.root)
        tasks = [t for t in tasks if t.jsonls]
    if not any(t.jsonls for t in tasks):
        raise UserError(f"{root}: no *.jsonl files (looked in it and in sub-folders up to 3 levels down)")
    return layout, tasks


def _ancestors(folder: str, stop: str) -> list[str]:
    """``folder`` and its parents, up to and including ``stop``."""
    out = [folder]
    while folder.rstrip("/") != stop.rstrip("/"):
        parent = posixpath.dirname(folder.rstrip("/"))
        if not parent or parent == folder or parent.endswith(":") or parent.endswith(":/"):
            break
        out.append(parent)
        folder = parent
    return out


class RefResolver:
    """Where a line's relative paths point: the original tool wrote them relative to the folder it ran in.

    The first of the JSONL's folder and its parents (up to the parent of the
    converted folder) where the first relative reference exists becomes the base
    for every relative reference of that kind in the file.  ``path_map`` rewrites
    prefixes of moved files first.
    """

    def __init__(self, candidates: list[str], storage_options: dict | None, path_map: list[tuple[str, str]]):
        self.candidates, self.storage_options, self.path_map = candidates, storage_options, path_map
        self.base: str | None = None

    def __call__(self, ref: str) -> str:
        for old, new in self.path_map:
            if ref.startswith(old):
                ref = new + ref[len(old) :]
                break
        if has_scheme(ref) or posixpath.isabs(ref):
            return ref
        if self.base is None:
            found = next((c for c in self.candidates if uri_exists(resolve_ref(ref, c), self.storage_options)), None)
            if found is None:  # reported as missing where it is read
                return resolve_ref(ref, self.candidates[0])
            self.base = found
        return resolve_ref(ref, self.base)


# ---- conversion --------------------------------------------------------------------------------


class NullEmbedding:
    """The task's empty-text embedding for its text-to-image samples.

    From ``--null_embedding``, else from a text-to-image line that carries
    ``embeddings_tensor_droptext``, else computed with ``--model_path``; without
    any, the first text-to-image line refuses the task.
    """

    def __init__(self, writer: TaskWriter, task: LegacyTask, options: ConvertOptions, storage_options: dict | None):
        self.writer, self.task, self.options = writer, task, options
        self.hidden: int | None = None
        self.ready = writer.has_null_embedding()
        if options.null_embedding:
            self._write(load_embedding_file(options.null_embedding, storage_options))

    def _write(self, tensor: torch.Tensor) -> None:
        self.writer.write_null_embedding(embedding_to_npy(tensor))
        self.hidden, self.ready = int(tensor.shape[1]), True

    def offer(self, tensor: torch.Tensor) -> None:
        if not self.ready:
            self._write(tensor)

    def require(self, jsonl: str, line: int) -> None:
        if self.ready:
            return
        if self.options.model_path:
            self._write(compute_null_embedding(self.options.model_path))
            return
        raise ConversionRefused(
            f"task {self.task.name}: {jsonl} line {line} is text-to-image (no source image) and has no "
            "embeddings_tensor_droptext, so its dropped text needs the empty-prompt embedding the original tool "
            "ships: give --null_embedding FILE (.pt or .npy), or --model_path MODEL_DIR to compute it"
        )


def compute_null_embedding(model_path: str) -> torch.Tensor:
    """The empty prompt under the T2I template, by our encoder (what extraction stores as the null embedding).
    The original tool's output is Qwen-Image-Edit's (2509)."""
    family = families.get(LEGACY_FAMILY)
    builder = family.prompt_builder(model_path, "firered")
    encoder = family.prompt_encoder(model_path)
    return encoder.encode([builder.t2i(family.null_text)], builder.drop_index)[0].to("cpu", torch.bfloat16)


def _convert_line(
    text: str,
    jsonl: str,
    number: int,
    rel: str,
    images: RefResolver,
    tensors: RefResolver,
    storage_options,
    hidden,
    train_copy_size: int = 0,
) -> tuple[PreparedSample, dict[str, torch.Tensor]] | Failure:
    try:
        record = parse_line(text, jsonl, number, base_dir="")  # relative paths stay as written, resolved below
    except RecordError as err:
        return Failure(err.file, err.line, "invalid_row", err.reason, err.field, text)
    record = dataclasses.replace(record, sources=tuple(map(images, record.sources)), target=images(record.target))
    row = json.loads(text)
    try:
        sources = [imaging.load(u, storage_options) for u in record.sources]
        target = imaging.load(record.target, storage_options)
    except imaging.ImageLoadError as exc:
        return Failure(jsonl, number, exc.kind, str(exc), None, text)
    embeddings: dict[str, torch.Tensor] = {}
    for name, variant in LEGACY_FIELDS.items():
        if not row.get(name):
            continue
        try:
            if not isinstance(row[name], str):
                raise ValueError(f"expected a path, got {type(row[name]).__name__}")
            tensor = load_embedding_file(tensors(row[name]), storage_options)  # .pt (weights only) or .npy
        except FileNotFoundError as exc:
            return Failure(jsonl, number, "missing_embedding", f"{name}: {exc}", name, text)
        except Exception as exc:
            return Failure(jsonl, number, "bad_embedding", f"{name}: {type(exc).__name__}: {exc}", name, text)
        if hidden is not None and tensor.shape[1] != hidden:
            reason = f"{name}: hidden size {tensor.shape[1]}, the task's other embeddings have {hidden}"
            return Failure(jsonl, number, "bad_embedding", reason, name, text)
        embeddings[variant] = tensor
    sample = sample_from_images(record, sources, target, train_copy_size)
    # per-rank files may share a name: the key comes from the path under the task folder
    sample.key = sample.meta["key"] = sample_key(rel.replace("/", "_"), number)
    for size_field in ("source_image_size", "edit_image_size"):
        sample.meta["extra"].pop(size_field, None)
    return sample, embeddings


def _hidden_from_shards(writer: TaskWriter, storage_options: dict | None) -> int | None:
    """Hidden size of the first stored embedding (when every line was converted by an earlier run)."""
    for commit in writer.commits:
        if commit.shard:
            for _, members in iter_samples(writer.store.url(commit.shard["url"]), storage_options):
                for name, data in members.items():
                    if name.startswith("emb_"):
                        return int(npy_to_embedding(data).shape[1])
    return None


def convert_task(task: LegacyTask, output_url: str, storage_options: dict | None, options: ConvertOptions) -> dict:
    """Every line of the task's JSONLs → a sample or a ``_failures/`` record; resumable (same input, same output)."""
    identity = {
        "converted_from": task.root,
        "inputs": task.jsonls,
        "path_map": [list(p) for p in options.path_map],
        # only when set: a conversion started before the flag existed resumes as before
        **({"train_copy_size": options.train_copy_size} if options.train_copy_size else {}),
    }
    writer = TaskWriter(output_url, storage_options, options.max_samples_per_shard, identity=identity)
    try:
        null = NullEmbedding(writer, task, options, storage_options)
        stop = posixpath.dirname(task.root.rstrip("/")) or task.root
        hidden = null.hidden
        bar = tqdm(desc=f"convert {task.name}", unit="sample", dynamic_ncols=True, mininterval=1.0)
        try:
            for part, rel in enumerate(task.jsonls):
                done = writer.open_part(part)
                jsonl = join(task.root, rel)
                candidates = _ancestors(posixpath.dirname(jsonl), stop)
                images = RefResolver(candidates, storage_options, options.path_map)
                tensors = RefResolver(candidates, storage_options, options.path_map)
                for number, text in iter_lines(jsonl, storage_options):
                    if number < len(done) and done[number]:
                        continue
                    result = _convert_line(
                        text, jsonl, number, rel, images, tensors, storage_options, hidden, options.train_copy_size
                    )
                    bar.update(1)
                    if isinstance(result, Failure):
                        log.warning("%s line %d: %s: %s", jsonl, number, result.kind, result.reason)
                        writer.fail(result)
                        continue
                    sample, embeddings = result
                    if sample.num_sources == 0:  # T2I: the empty text is the task's null embedding
                        if "drop" in embeddings:
                            null.offer(embeddings.pop("drop"))
                        null.require(jsonl, number)
                    hidden = hidden or next((int(t.shape[1]) for t in embeddings.values()), None)
                    writer.add(sample, embeddings)
        finally:
            bar.close()
            writer.close_part()
        hidden = hidden or _hidden_from_shards(writer, storage_options)
        if null.hidden is not None and hidden is not None and null.hidden != hidden:
            raise ConversionRefused(
                f"task {task.name}: the null embedding has hidden size {null.hidden}, the task's embeddings {hidden}"
            )
        return writer.close(*converted_manifest(task, options, hidden))
    finally:
        writer.release()  # the lease, whatever happened


def converted_manifest(task: LegacyTask, options: ConvertOptions, hidden: int | None) -> tuple[dict, dict]:
    """A converted task's manifest (the original tool's prompts are firered's) and what it adds to the writer's."""
    model = {
        "path": options.model_path,
        "config_sha256": _config_digest(options.model_path),
        "hidden_size": hidden,
        "compute_dtype": None,
        "converted_from": task.root,
    }
    base = new_manifest(task.name, model, "firered", dict(REAL_DROP_INDEX))
    extra = {"inverse": True, "converted_from": task.root}
    if options.train_copy_size:
        extra["train_copy_size"] = options.train_copy_size
    return base, extra


def _config_digest(model_path: str | None) -> str | None:
    if not model_path:
        return None
    return families.get(LEGACY_FAMILY).encoder_digest(model_path)


def convert_legacy(
    root: str, output_url: str, storage_options: dict | None, options: ConvertOptions, layout: str = "auto"
) -> dict[str, Any]:
    """Convert the original tool's output: one task (``--layout task``) or a meta folder of tasks (``meta``).

    Returns ``{"layout", "tasks": {name: manifest}, "refused": {name: reason}}``;
    with ``meta`` each task goes to ``output_url/<name>``.
    """
    name = output_url.rstrip("/").rsplit("/", 1)[-1]
    layout, tasks = find_legacy_tasks(root, storage_options, layout, name)
    log.info("%s: %s layout, %d task(s): %s", root, layout, len(tasks), ", ".join(t.name for t in tasks))
    manifests, refused = {}, {}
    for task in tasks:
        out = output_url if layout == "task" else join(output_url, task.name)
        try:
            manifests[task.name] = convert_task(task, out, storage_options, options)
        except ConversionRefused as exc:
            log.error("%s", exc)
            refused[task.name] = str(exc)
    return {"layout": layout, "tasks": manifests, "refused": refused}
