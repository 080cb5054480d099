"""The data options: which tasks a run reads and how they are mixed (:class:`DataConfig`), and how the stream
turns them into batches (:class:`StreamConfig`); the parsers of their flag forms."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from pipeline.common.flags import STORAGE_OPTIONS_HELP
from pipeline.common.options import (
    INVOCATION,
    Checked,
    at_least,
    between,
    option,
)
from pipeline.errors import UserError
from pipeline.shards.storage import parse_storage_options
from pipeline.shards.tasks import DataConfigError


def parse_weights(text: str, flag: str) -> dict[str, float]:
    """``"a=0.5,b=1.2"`` → ``{"a": 0.5, "b": 1.2}``; clear errors naming the flag."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"{flag}: expected NAME=WEIGHT, got {item!r}")
        try:
            weight = float(value)
        except ValueError:
            raise UserError(f"{flag}: weight of {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:  # inf would make every probability NaN
            raise UserError(f"{flag}: the weight of {name!r} must be a finite number >= 0, got {value!r}")
        if name in weights:
            raise UserError(f"{flag}: {name!r} is listed twice")
        weights[name] = weight
    if not weights:
        raise UserError(f"{flag}: no weights given")
    return weights


def parse_shard_flags(values: list[str]) -> dict[str, list[str]]:
    """``--train_shards task=PATTERN`` (repeatable) → task → patterns."""
    out: dict[str, list[str]] = {}
    for value in values:
        name, sep, pattern = value.partition("=")
        if not sep or not name.strip() or not pattern.strip():
            raise DataConfigError(f"--train_shards expects TASK=URL_PATTERN, got {value!r}")
        out.setdefault(name.strip(), []).append(pattern.strip())
    return out


def split_patterns(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"a,b c"`` or ``["a,b", "c"]`` (``nargs="+"`` flags) → ``["a", "b", "c"]``."""
    if isinstance(text, list | tuple):
        text = " ".join(text)
    return [p for p in (text or "").replace(",", " ").split() if p]


MIB = 1 << 20
# the crop's side: at the widest bucket (4:1) a side of S puts the long side at 2S, whose S/16 RoPE positions the
# text starts after (diffusers' scale_rope); 4096 leaves 3840 of the 4096 text positions, and is 4× the published
# training size (a larger number is a typo, and every prompt would be refused as too long)
MAX_IMAGE_SAMPLE_SIZE = 4096


def _mib(value: float, args=None) -> int:
    return int(value * MIB)


def _weights(flag: str):
    return lambda text, args=None: parse_weights(text, f"--{flag}") if text else None


def _patterns(value, args=None) -> tuple[str, ...]:
    return tuple(split_patterns(value))


def _data_url(args: argparse.Namespace) -> str | None:
    """The URL the run reads (flat --storage_options apply to its protocol)."""
    patterns = parse_shard_flags(args.train_shards)
    return args.train_data_meta_dir or next((p[0] for p in patterns.values() if p), None)


@dataclass(frozen=True)
class DataConfig(Checked):
    """Which tasks to read and how they are mixed."""

    meta_dir: str | None = option(
        None,
        "folder or URL whose subfolders with a manifest.json are the tasks (listed once at start-up)",
        flag="train_data_meta_dir",
    )
    shard_patterns: dict[str, list[str]] = option(
        [],
        "explicit shards of a task, brace patterns allowed (repeatable); the source count comes from the "
        "src{N}/ folder; local, s3://, gs://, http(s):// and pipe: URLs",
        flag="train_shards",
        append=True,
        metavar="TASK=URL_PATTERN",
        convert=lambda values, args=None: parse_shard_flags(values),
    )
    task_weights: dict[str, float] | None = option(
        None,
        'sampling weight per task, "task_a=0.5,task_b=1.2"; tasks not listed are not used '
        "(default: every task, weight 1)",
        flag="train_data_weights",
        convert=_weights("train_data_weights"),
        weights=True,
    )
    source_count_weights: dict[str, float] = option(
        "0=0,1=10,2=0,3=0",
        'weight per number of source images, "0=1,1=1,2=1,3=0"; drawn per step, the same on every rank '
        "(default: the original tool's, single-source edits only)",
        flag="train_src_img_num_weights",
        convert=_weights("train_src_img_num_weights"),
        weights=True,
    )
    num_workers: int = option(
        0,
        "DataLoader workers per rank (0: the main process)",
        flag="dataloader_num_workers",
        check=at_least(0),
        aliases=("num_workers",),
        scope=INVOCATION,
    )
    prefetch_factor: int = option(2, "batches each worker prepares ahead", scope=INVOCATION, check=at_least(1))
    trace_path: str | None = option(
        None,
        "append one JSON line per step and rank (task, N, bucket, keys, variants, texts) to this file",
        flag="data_trace",
        scope=INVOCATION,
    )
    allow_mixed_conditioning: bool = option(
        False,
        "train on tasks whose manifests disagree on prompt style or encoder (config digest); refused "
        "by default. Different embedding hidden sizes are always refused",
    )


@dataclass(frozen=True)
class StreamConfig(Checked):
    """What the per-rank batch stream needs."""

    batch_size: int = option(16, "samples per batch and rank", flag="train_batch_size", check=at_least(1))
    seed: int = option(42, "seed of every data, noise and validation draw")
    shuffle_buffer: int = option(
        64,
        "streamed shards only (pipe:, no index): samples in each stream's shuffle buffer; indexed shards follow "
        "a computed sample-level order and need none",
        check=at_least(0),
    )
    image_sample_size: int = option(
        512, "crop area ≈ this squared (sides /32)", check=between(1, MAX_IMAGE_SAMPLE_SIZE)
    )
    enable_inverse: bool = option(False, "also train on inverse instructions (swap roles)")
    text_drop_ratio: float = option(0.05, "probability of the empty-text embedding", check=between(0, 1))
    storage_options: dict | None = option(
        None,
        STORAGE_OPTIONS_HELP,
        convert=lambda text, args=None: text if args is None else parse_storage_options(text, _data_url(args)),
    )
    online_prompts: bool = False  # --condition_encoder_mode sync: batches carry images + text, not embeddings
    pool_bytes: int = option(
        128,
        "MiB of samples a DataLoader worker keeps waiting in aspect-bucket pools and shuffle buffers, over all "
        "streams; past it batches are made from similar buckets",
        flag="pool_mb",
        flag_type=float,
        convert=_mib,
        check=at_least(0),
    )
    max_bad_in_a_row: int = option(
        1000,
        "a stream (task, source count) stops the run after this many unusable samples in a row (unreadable, corrupt "
        "or undecodable; each is skipped, counted and logged); an indexed task also stops after a whole failed pass",
        scope=INVOCATION,
        check=at_least(1),
    )
    readahead_bytes: int = option(
        64,
        "MiB of range reads a DataLoader worker keeps in flight for the samples it needs next (indexed shards, "
        "8 threads); 0 reads one sample after another",
        flag="readahead_mb",
        flag_type=float,
        convert=_mib,
        check=at_least(0),
    )
