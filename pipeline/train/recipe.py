"""Recipe files: ``--config recipe.yaml`` holds flags, the command line overrides them, the resolved set is kept.

A recipe is a YAML mapping from flag names (without the dashes, aliases allowed)
to values.  It becomes command-line tokens placed *before* the real ones, so
argparse checks types and choices exactly as for typed flags and a later flag on
the command line wins.  The resolved flags go to ``output_dir/config.yaml``; a
resume compares them with what the run was started with.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.common.options import (
    INVOCATION,
    MODEL,
    flag_names,
    one_name_per_option,
    unordered_flags,
    weight_flags,
)
from pipeline.errors import UserError
from pipeline.files import atomic_write
from pipeline.train.config import OPTION_CLASSES

log = logging.getLogger(__name__)

RECIPE_FILE = "config.yaml"

# flags that steer one invocation, not the training: never compared on resume
RUN_ONLY = frozenset({"config"}) | flag_names(*OPTION_CLASSES, scope=INVOCATION)
WEIGHT_FLAGS = weight_flags(*OPTION_CLASSES)
UNORDERED_FLAGS = unordered_flags(*OPTION_CLASSES)  # "to_q, to_k" is "to_k,to_q"
# a change of these means another model: refused on resume unless --allow_recipe_change
MODEL_FLAGS = flag_names(*OPTION_CLASSES, scope=MODEL)


class RecipeError(UserError):
    """A recipe file that cannot be used; the message names the file and the key."""


class DuplicateKey(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise DuplicateKey(f"line {key_node.start_mark.line + 1}: {key} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"--config {path}: cannot read it ({exc})") from None
    try:
        recipe = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKey as exc:
        raise RecipeError(f"--config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"--config {path}: not valid YAML ({exc})") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"--config {path}: expected a mapping of flag names to values, got {type(recipe).__name__}")
    return recipe


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Flag name without dashes → its action (aliases included)."""
    out = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                out[option[2:]] = action
    return out


def _given(argv: list[str], action: argparse.Action) -> bool:
    return any(a == o or a.startswith(o + "=") for a in argv for o in action.option_strings)


def _scalar(path: str, key: str, value: Any, action: argparse.Action) -> str:
    if isinstance(value, bool):  # YAML 1.1 reads `no` / `yes` as booleans
        word = "yes" if value else "no"
        if action.choices and word in action.choices:
            return word
        raise RecipeError(f"--config {path}: {key}: expected a value, got {value!r}")
    if isinstance(value, dict):  # weights: {task_a: 0.5, task_b: 1}
        text = ",".join(f"{k}={v}" for k, v in value.items())
        if key in WEIGHT_FLAGS:
            from pipeline.train.config.data import parse_weights

            try:
                parse_weights(text, key)
            except ValueError as exc:
                raise RecipeError(f"--config {path}: {exc}") from None
        return text
    if isinstance(value, list | tuple):
        raise RecipeError(f"--config {path}: {key}: takes one value, got a list")
    return str(value)


def recipe_argv(parser: argparse.ArgumentParser, recipe: dict[str, Any], argv: list[str], path: str) -> list[str]:
    """Command-line tokens for ``recipe`` (checked against ``parser``), before ``argv`` so that it overrides."""
    options = _options(parser)
    tokens: list[str] = []
    for key, value in recipe.items():
        action = options.get(str(key).lstrip("-"))
        if action is None or key == "config":
            raise RecipeError(
                f"--config {path}: unknown key {key!r} (keys are flag names without the dashes, see --help)"
            )
        option = "--" + str(key).lstrip("-")
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreConstAction):
            if not isinstance(value, bool):
                raise RecipeError(f"--config {path}: {key}: expected true or false, got {value!r}")
            tokens += [option] if value else []
        elif isinstance(action, argparse._AppendAction):
            if _given(argv, action):  # the command line's list replaces the recipe's
                continue
            items = value if isinstance(value, list) else [value]
            if isinstance(value, dict):  # train_shards: {task: pattern or [patterns]}
                items = [f"{t}={p}" for t, ps in value.items() for p in (ps if isinstance(ps, list) else [ps])]
            for item in items:
                tokens += [option, _scalar(path, key, item, action)]
        elif action.nargs in ("+", "*"):
            items = value if isinstance(value, list) else [value]
            if not items:
                continue
            tokens += [option, *(_scalar(path, key, item, action) for item in items)]
        else:
            tokens += [option, _scalar(path, key, value, action)]
    return tokens


def parse_with_recipe(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE`` the file's flags come first and the command line overrides them."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)
    known, _ = first.parse_known_args(argv)
    one_name_per_option(parser, argv)
    if not known.config:
        return parser.parse_args(argv)
    recipe = load_recipe(known.config)
    tokens = recipe_argv(parser, recipe, argv, known.config)
    try:
        one_name_per_option(parser, tokens, f"--config {known.config}")
    except UserError as exc:
        raise RecipeError(str(exc)) from None
    return parser.parse_args([*tokens, *argv])


# ---------------------------------------------------------------------------------------------
# the resolved recipe of a run


MODEL_PATHS = ("pretrained_model_name_or_path", "transformer_path", "vae_path")
MODEL_IDENTITY = "model_identity"  # config.yaml: the model's content, compared instead of how its path is spelled
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


CONTENT_SLICES, SLICE_BYTES = 16, 64 << 10  # bytes sampled through each weight file: ~1 MiB of 40 GB
SAMPLED = "+"  # the sampled-content digest follows the older layout identity after this mark


def sampled_digest(file: Path) -> str:
    """A weight file's content without reading it all: its header (a safetensors header whole: names, dtypes,
    shapes, offsets) and :data:`CONTENT_SLICES` slices spread evenly over the rest, the last ending at the end.
    Other weights of the same layout (FireRed-Image-Edit in place of 2509, a newer revision) differ in every slice."""
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(file, "rb") as handle:
        head = handle.read(8)
        header = int.from_bytes(head, "little") + 8 if file.suffix == ".safetensors" and len(head) == 8 else 1 << 20
        handle.seek(0)
        digest.update(handle.read(min(header, size, 256 << 20)))
        for k in range(CONTENT_SLICES):
            handle.seek(max(0, (size - SLICE_BYTES) * k // (CONTENT_SLICES - 1)))
            digest.update(handle.read(SLICE_BYTES))
    return digest.hexdigest()


def content_identity(path: str | None) -> str | None:
    """What a model path holds, independent of its spelling (another path or a symlink to the same weights is the
    same model): ``LAYOUT+CONTENT``. LAYOUT is what older versions recorded — for a folder, the digest of its
    configs (``*.json``) and its weight files' names and sizes; for one file, its size and the digest of its first
    MiB — and CONTENT the :func:`sampled_digest` of every weight file. A name that is no local path (a Hub id)
    stands for itself."""
    if not path:
        return None
    local = Path(path).expanduser()
    layout, content = hashlib.sha256(), hashlib.sha256()
    if local.is_dir():
        for file in sorted(local.rglob("*")):
            relative = file.relative_to(local).as_posix()
            if not file.is_file() or any(part.startswith(".") for part in Path(relative).parts):
                continue
            if file.suffix == ".json":
                layout.update(f"{relative}\0".encode() + file.read_bytes())
            elif file.suffix in _WEIGHT_SUFFIXES:
                layout.update(f"{relative}\0{file.stat().st_size}\0".encode())
                content.update(f"{relative}\0{sampled_digest(file)}\0".encode())
        return f"folder:{layout.hexdigest()}{SAMPLED}{content.hexdigest()}"
    if local.is_file():
        with open(local, "rb") as handle:
            layout.update(handle.read(1 << 20))
        return f"file:{local.stat().st_size}:{layout.hexdigest()}{SAMPLED}{sampled_digest(local)}"
    return f"name:{path}"


def _identities_alike(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both runs' model identities as far as both recorded them: a run started by an older version recorded the
    layout alone, and is compared on it (it resumes as before; its next ``config.yaml`` has the content too)."""
    a, b = dict(old.get(MODEL_IDENTITY) or {}), dict(new.get(MODEL_IDENTITY) or {})
    for flag in set(a) & set(b):
        if isinstance(a[flag], str) and isinstance(b[flag], str) and (SAMPLED in a[flag]) != (SAMPLED in b[flag]):
            a[flag], b[flag] = a[flag].split(SAMPLED)[0], b[flag].split(SAMPLED)[0]
    return {**old, MODEL_IDENTITY: a}, {**new, MODEL_IDENTITY: b}


def with_model_identity(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe with :data:`MODEL_IDENTITY`: each model path's :func:`content_identity`."""
    return {**recipe, MODEL_IDENTITY: {flag: content_identity(recipe.get(flag)) for flag in MODEL_PATHS}}


def _comparable(recipe: dict[str, Any], paths_by_content: bool) -> dict[str, Any]:
    from pipeline.train.config.data import parse_weights, split_patterns

    out = {k: v for k, v in recipe.items() if k not in RUN_ONLY}
    if paths_by_content:  # both recipes identify the model by content: its path may be spelled any way
        for flag in MODEL_PATHS:
            out.pop(flag, None)
    else:  # a config.yaml of an older version: the paths, normalised
        out.pop(MODEL_IDENTITY, None)
        for flag in MODEL_PATHS:
            if isinstance(out.get(flag), str):
                out[flag] = os.path.normpath(os.path.abspath(os.path.expanduser(out[flag])))
    for key in UNORDERED_FLAGS:
        if isinstance(out.get(key), str | list | tuple):
            out[key] = sorted(set(split_patterns(out[key])))
    for key in WEIGHT_FLAGS:
        if isinstance(out.get(key), str):
            try:
                out[key] = dict(sorted(parse_weights(out[key], key).items()))
            except ValueError:
                pass
    return out


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings that differ between two resolved recipes: key → (old, new)."""
    by_content = MODEL_IDENTITY in old and MODEL_IDENTITY in new
    if by_content:
        old, new = _identities_alike(old, new)
    a, b = _comparable(old, by_content), _comparable(new, by_content)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_recipe(output_dir: str | os.PathLike, recipe: dict[str, Any], step: int, allow_change: bool) -> dict:
    """On resume: report what changed since the run's ``config.yaml``; a changed model is refused (read-only)."""
    path = Path(output_dir) / RECIPE_FILE
    if not path.is_file():
        log.warning("resuming at step %d: %s is missing, so changed settings cannot be reported", step, path)
        return {}
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML ({exc}); restore it, or delete it to resume unchecked") from None
    if not isinstance(old, dict):
        raise RecipeError(f"{path} holds a {type(old).__name__}, not the run's settings; restore or delete it")
    changes = recipe_changes(old, recipe)
    for key, (before, after) in changes.items():
        log.warning("resuming at step %d with a changed setting: %s: %r -> %r", step, key, before, after)
    model = sorted(set(changes) & (MODEL_FLAGS | {MODEL_IDENTITY}))
    if model and not allow_change:
        raise RecipeError(
            f"resuming at step {step}: the model settings differ from {path}: "
            + "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in model)
            + ". Give the run's own settings, or --allow_recipe_change to resume anyway"
        )
    return changes


def write_recipe(output_dir: str | os.PathLike, recipe: dict[str, Any], step: int, changes: dict) -> Path:
    """Rank 0: ``config.yaml`` with the resolved flags; the one it replaces is kept when settings changed."""
    path = Path(output_dir) / RECIPE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if changes and path.is_file():
        kept = path.with_name(f"config-before-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        os.replace(path, kept)
        log.info("the settings the run had before step %d: %s", step, kept)
    atomic_write(path, yaml.safe_dump(recipe, sort_keys=True, allow_unicode=True).encode("utf-8"))
    return path
