"""What the CLIs' shared flags say and default to, written once (storage options, shard size, failure ratio,
timeouts, training copies; each CLI declares them as config fields with these), and the argparse checks they use."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pipeline.errors import UserError

STORAGE_OPTIONS_HELP = (
    'JSON fsspec options per protocol, e.g. \'{"s3": {"endpoint_url": "http://host:9000"}, "gs": {...}}\', '
    "or flat ({...}): then they apply to the protocol of the URL the command writes (or reads), not to image "
    "fetches over http(s); AWS_*, STORAGE_EMULATOR_HOST, GOOGLE_APPLICATION_CREDENTIALS and FSSPEC_* "
    "environment variables are honoured without it"
)


DEFAULT_SHARD_SAMPLES = 1000


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (``0`` would mean one sample per shard; refused with the usage line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a number >= 1, got {value}")
    return value


def shard_size_help(default: int) -> str:
    return f"start a new shard after this many samples (default {default})"


DEFAULT_MAX_FAILURE_RATIO = 0.05


MAX_FAILURE_RATIO_HELP = (
    "exit 1 when more than this fraction of the input lines (or samples) failed, or none was written; "
    f"the failures are in the output's _failures/ either way (default {DEFAULT_MAX_FAILURE_RATIO})"
)


def ddp_timeout_help(default: int, longest: str) -> str:
    """``--ddp_timeout``'s help (training and extraction declare it with their own default)."""
    return (
        "seconds one rank may wait for the others in a collective (the transformers Trainer's flag): the process "
        f"group's limit (NCCL's watchdog on GPUs) and the limit of every wait for rank 0. Default {default}: "
        f"{longest}. A wait past it ends the run with one line naming what was being waited for"
    )


TRAIN_DDP_TIMEOUT = 1800  # seconds: the longest rank-0 phase at 20B (docs/training.md) with a wide margin
EXTRACT_DDP_TIMEOUT = 24 * 3600  # seconds: at the end the ranks wait for the slowest one's share of the input
# 30 days: beyond any wait a run has; a larger number is a typo (Python's timedelta overflows past ~2.7e12 s and the
# process group's start fails with a traceback)
MAX_DDP_TIMEOUT = 30 * 24 * 3600


NO_TRAIN_COPIES = 0  # --train_copy_size's default: originals only


def train_copy_size_help(replaces: bool = False) -> str:
    return (
        "also store a training copy of each image that training at --image_sample_size N would shrink: "
        "shrunk as training shrinks it, raw uint8 .npy beside the original. Training then crops without "
        "decoding (same pixels) whenever the crop fits the copy (always at batch size 1 and this size), else "
        "from the original. Costs ~3 bytes a training pixel per image in the shards; 0 (default): "
        + ("copies kept as the task has them; N replaces them" if replaces else "originals only")
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def require_model_folder(path: str | None, flag: str) -> None:
    """A model given as a folder must be one: ``/nonexistent`` or a file is the user's mistake, said in one line
    (the loaders would try the Hub and fail with a message about repo ids or the internet connection). A name
    shaped like a Hub id (``org/name``) that is no folder here is left to the loaders."""
    if not path:
        return
    local = Path(path).expanduser()
    if local.is_dir():
        return
    if local.exists():
        raise UserError(f"{flag} {path} is a file; give the model's diffusers folder (with model_index.json)")
    if not _HUB_ID.fullmatch(path):
        raise UserError(f"{flag} {path}: no such folder")
