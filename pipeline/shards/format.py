"""Shard format v1: sample ↔ tar members, embeddings as ``.npy``, shard index, manifest.

A task directory holds ``src{N}/{rank:05d}-{seq:06d}.tar`` shards (N = number of
source images), a ``.index.json`` beside each shard with every member's byte
range (so readers can seek to a sample or fetch one embedding without reading
the rest), ``null_embedding.npy`` when the task has text-to-image samples, and
``manifest.json``, written last.  Everything is readable without pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from typing import Any

import numpy as np
import torch

FORMAT_NAME = "qwen-edit-shards"
FORMAT_VERSION = 1
KNOWN_FORMAT_VERSIONS = (1, 2)  # what this version's readers understand; a manifest of another is refused
# the model family of a manifest that names none: every task written before families were recorded is v1 and
# Qwen-Image-Edit's (the same default completes an older extraction identity)
DEFAULT_FAMILY = "qwen_edit"
MANIFEST = "manifest.json"
NULL_EMBEDDING = "null_embedding.npy"
EMBEDDING_NPY_DTYPE = "<u2"  # bfloat16 bit pattern, little-endian
EMBEDDING_DTYPE = "bfloat16"
FORBIDDEN_SUFFIXES = (".pyd", ".pickle", ".pkl", ".pth", ".pt")
MAX_SOURCES = 3  # source images per sample: 0 (text-to-image) to 3
SOURCE_COUNTS = tuple(range(MAX_SOURCES + 1))
# embedding variants of a sample, in member order
VARIANTS = ("en", "cn", "drop", "en_inv", "cn_inv", "drop_inv")
# the row's text field each variant encodes (the drop variants encode the empty text): the one mapping
VARIANT_TEXT = {
    "en": "instruction",
    "cn": "instruction_cn",
    "en_inv": "inverse_instruction",
    "cn_inv": "inverse_instruction_cn",
}
TEXT_FIELDS = tuple(VARIANT_TEXT.values())
COPY_PREFIX = "copy_"  # role of an image's training-size copy: copy_target, copy_source0 … (member .npy)


def source_dir(num_sources: int) -> str:
    """The folder of a task holding the shards of samples with ``num_sources`` source images."""
    return f"src{num_sources}"


def shard_name(num_sources: int, rank: int, seq: int) -> str:
    return f"{source_dir(num_sources)}/{rank:05d}-{seq:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".index.json"


def sample_key(input_file: str, line: int) -> str:
    """Stable key from the input file's name and the 0-based line: no dots (webdataset splits on them)."""
    stem = input_file.rstrip("/").rsplit("/", 1)[-1]
    stem = stem[: -len(".jsonl")] if stem.endswith(".jsonl") else stem
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "input"
    return f"{stem}-{line:09d}"


def embedding_to_npy(tensor: torch.Tensor) -> bytes:
    """``[seq, hidden]`` → ``.npy`` bytes of the bfloat16 bit pattern (``<u2``)."""
    if tensor.dim() != 2:
        raise ValueError(f"embedding must be 2-D [seq, hidden], got shape {tuple(tensor.shape)}")
    bits = tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(EMBEDDING_NPY_DTYPE)
    buf = io.BytesIO()
    np.save(buf, bits, allow_pickle=False)
    return buf.getvalue()


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, payload offset) of an ``.npy``; raises if the payload length does not match (truncated)."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buf)
    if len(data) - buf.tell() != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"embedding npy holds {len(data) - buf.tell()} bytes, its header says {shape} {dtype}")
    if fortran or dtype.hasobject:
        raise ValueError(f"embedding npy must be a C-ordered plain array, got {dtype} fortran={fortran}")
    return tuple(shape), dtype, buf.tell()


def check_npy(data: bytes) -> None:
    """Raise if the ``.npy`` header does not match the payload length (a truncated member)."""
    _npy_header(data)


def npy_to_embedding(data: bytes) -> torch.Tensor:
    """Inverse of :func:`embedding_to_npy`; never unpickles; a short (truncated) array is an error.

    One copy: the payload is viewed in place (the header is parsed, not the array) and
    copied once into the tensor.
    """
    shape, dtype, offset = _npy_header(data)
    if dtype != np.dtype(EMBEDDING_NPY_DTYPE) or len(shape) != 2:
        raise ValueError(f"embedding npy must be 2-D {EMBEDDING_NPY_DTYPE}, got {dtype} {shape}")
    raw = np.frombuffer(data, dtype=dtype, count=shape[0] * shape[1], offset=offset).reshape(shape)
    return torch.from_numpy(raw.astype(np.int16)).view(torch.bfloat16)  # astype: the one copy (and byte order)


class TarShardWriter:
    """Writes one tar to a local file and records each member's byte range.

    Members are written with fixed metadata (mtime 0, uid 0) so the same
    samples give the same bytes.
    """

    def __init__(self, local_path: str):
        self.local_path = local_path
        self._file = open(local_path, "wb")  # noqa: SIM115 - closed in close()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.index: list[dict[str, Any]] = []

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample; ``members`` maps extension (``json``, ``target.png`` …) to bytes."""
        if unsafe_name(key):  # writers check keys first; this keeps a path escape out of every shard
            raise ValueError(f"refusing to write member names under {key!r}: {unsafe_name(key)}")
        start = self._tar.offset
        offsets = {}
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            offsets[ext] = [self._tar.offset - padded, len(data)]
        self.index.append({"key": key, "offset": start, "size": self._tar.offset - start, "members": offsets})

    @property
    def bytes_written(self) -> int:
        return self._file.tell()

    def __len__(self) -> int:
        return len(self.index)

    def close(self) -> tuple[int, str]:
        """Finish the tar; returns (size, sha256)."""
        self._tar.close()
        self._file.flush()
        self._file.close()
        digest = hashlib.sha256()
        size = 0
        with open(self.local_path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()


def copy_role(role: str) -> str:
    return COPY_PREFIX + role


def image_entry(meta: dict[str, Any], role: str) -> dict[str, Any]:
    """The json entry (member, size, copy …) of image ``role``: ``target`` or ``source{k}``."""
    return meta["target"] if role == "target" else meta["sources"][int(role[len("source") :])]


def image_to_npy(pixels: np.ndarray) -> bytes:
    """A training copy: uint8 ``[height, width, 3]`` RGB as ``.npy`` (no codec: read and used as is)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"a training copy is uint8 [h, w, 3], got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(pixels), allow_pickle=False)
    return buf.getvalue()


def npy_to_image(data: bytes) -> np.ndarray:
    """Inverse of :func:`image_to_npy`, viewed in place (read-only, no copy); a short array is an error."""
    shape, dtype, offset = _npy_header(data)
    if dtype != np.uint8 or len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"a training copy must be uint8 [h, w, 3], got {dtype} {shape}")
    return np.frombuffer(data, dtype=np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)


def sample_members(
    meta: dict[str, Any], images: dict[str, tuple[str, bytes]], embeddings: dict[str, bytes]
) -> dict[str, bytes]:
    """All tar members of one sample: json, images by role, ``emb_{variant}.npy``.

    Order matters for range reads: the json, the originals that have no training copy and the
    copies come first (one contiguous read for training), then the originals that have a copy
    (read only when a crop needs more pixels than the copy holds), then the embeddings.
    """
    members = {"json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}
    copied = {role[len(COPY_PREFIX) :] for role in images if role.startswith(COPY_PREFIX)}
    first = [r for r in images if r not in copied and not r.startswith(COPY_PREFIX)]
    copies = [r for r in images if r.startswith(COPY_PREFIX)]
    for role in [*first, *copies, *(r for r in images if r in copied)]:
        ext, data = images[role]
        members[f"{role}.{ext}"] = data
    for variant, data in embeddings.items():
        members[f"emb_{variant}.npy"] = data
    return members


def unsafe_name(name: str) -> str | None:
    """Why a member name must not be written or copied (a tar member that extracts outside its folder), or None."""
    if not name or "\0" in name or "\\" in name:
        return "an empty name, a NUL or a backslash"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a '..' component"
    return None


def is_forbidden_member(name: str) -> bool:
    """Members that default decoders would unpickle (``x.pyd``, or the bare extension ``pyd``); never decoded."""
    return ("." + name).lower().endswith(FORBIDDEN_SUFFIXES)


def variant_shape(entry: Any) -> list[int] | None:
    """The stored rows' shape of a sample json's ``variants`` entry: ``[seq, hidden]`` (v1), or the ``shape`` of
    ``{"shape": [...], "slots": [...]}`` (v2)."""
    shape = entry.get("shape") if isinstance(entry, dict) else entry
    return list(shape) if isinstance(shape, list | tuple) else None


def new_manifest(
    task: str,
    model: dict[str, Any],
    prompt_style: str,
    drop_index: dict[str, int],
    family: str = DEFAULT_FAMILY,
    format_version: int = FORMAT_VERSION,
) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": format_version,
        "family": family,
        "task": task,
        "model": model,
        "prompt_style": prompt_style,
        "drop_index": drop_index,
        "embedding": {"npy_dtype": EMBEDDING_NPY_DTYPE, "dtype": EMBEDDING_DTYPE, "hidden_size": model["hidden_size"]},
        "variants": [],
        "null_embedding": None,
        "shards": [],
        "totals": {},
        "failures": 0,
    }


def add_totals(manifest: dict[str, Any]) -> None:
    """Fill ``totals`` per source count from the shard entries."""
    totals: dict[str, dict[str, int]] = {}
    for shard in manifest["shards"]:
        entry = totals.setdefault(str(shard["num_sources"]), {"shards": 0, "samples": 0, "bytes": 0})
        entry["shards"] += 1
        entry["samples"] += shard["samples"]
        entry["bytes"] += shard["bytes"]
    manifest["totals"] = dict(sorted(totals.items()))
