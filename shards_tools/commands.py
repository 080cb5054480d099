"""The subcommands of ``python -m shards_tools``: each one's options declared once, as fields.

As for the two main CLIs (``pipeline/common/options.py``), a field *is* the flag:
its default, help, choices and check are written here and the subparser is derived
from them; the handler receives the built options object, never a Namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.common.flags import (
    DEFAULT_MAX_FAILURE_RATIO,
    MAX_FAILURE_RATIO_HELP,
    NO_TRAIN_COPIES,
    STORAGE_OPTIONS_HELP,
    positive_int,
    train_copy_size_help,
)
from pipeline.common.options import Checked, at_least, between, option
from pipeline.families import FAMILIES
from shards_tools.convert import LAYOUTS, ConvertOptions


@dataclass
class Output(Checked):
    """What every command that reads shards takes: how to reach the store, and how to print."""

    json: bool = option(False, "print JSON instead of text")
    storage_options: str | None = option(None, STORAGE_OPTIONS_HELP)


@dataclass
class TinyModel(Checked):
    out_dir: str = option(None, "directory to write (created if missing)", positional=True)
    seed: int = option(0, "weight initialisation seed (default: 0)")
    size: str = option(
        "tiny",
        "tiny: 4 MB, for tests and the demo (default); bench: ~60 MB, big enough that the encoder forward dominates "
        "CPU benchmarks",
        choices=("tiny", "bench"),
    )
    variant: str = option(
        "2509",
        "2509 (default; also the layout of FireRed-Image-Edit 1.0/1.1) or 2511 (zero_cond_t: the source images' "
        "tokens are modulated as at t = 0)",
        choices=("2509", "2511"),
    )
    family: str = option(
        "qwen_edit",
        "qwen_edit (default: Qwen-Image-Edit, --variant picks 2509 or 2511) or qwen_image21 (Qwen-Image 2.1: "
        "Qwen3-VL, the single-stream DiT, the RGBA VAE)",
        choices=tuple(FAMILIES),
    )


@dataclass
class SampleData(Checked):
    out_dir: str = option(None, "directory to write (created if missing)", positional=True)
    samples: int = option(12, "samples per task (default: 12)", check=at_least(1))
    seed: int = option(0, "random seed for crops and scenes (default: 0)")


@dataclass
class Inspect(Output):
    url: str = option(None, "shard URL, task directory or meta directory (local or fsspec URL)", positional=True)
    limit: int | None = option(None, "stop after this many samples", check=at_least(1))


@dataclass
class Stats(Output):
    url: str = option(None, "task directory or meta directory", positional=True)


@dataclass
class Verify(Output):
    url: str = option(None, "task directory or meta directory", positional=True)


@dataclass
class Preview(Output):
    url: str = option(None, "shard URL, task directory or meta directory", positional=True)
    out: str = option(None, "PNG file to write", required=True)
    samples: int = option(16, "rows (default 16)", check=at_least(1))


def failure_ratio() -> Any:
    """``--max_failure_ratio``: the writers' one exit policy (convert-legacy and reshard, as extract)."""
    return option(DEFAULT_MAX_FAILURE_RATIO, MAX_FAILURE_RATIO_HELP, check=between(0, 1))


@dataclass
class ConvertLegacy(ConvertOptions, Output):
    legacy_dir: str = option(
        None, "the original tool's output folder (local or fsspec URL)", positional=True, metavar="LEGACY_DIR"
    )
    output_dir: str = option(None, "new task directory, or meta directory for a meta layout", required=True)
    layout: str = option(
        "auto",
        "task: LEGACY_DIR is one task; meta: each sub-folder is a task; auto (default): task when LEGACY_DIR holds "
        "JSONLs or only per-rank sub-folders (rank0, 003) do, else meta",
        choices=tuple(LAYOUTS),
    )
    max_failure_ratio: float = failure_ratio()


@dataclass
class Reshard(Output):
    url: str = option(None, "task directory", positional=True)
    output_dir: str = option(None, "new task directory", required=True)
    train_copy_size: int = option(NO_TRAIN_COPIES, train_copy_size_help(replaces=True))
    max_samples_per_shard: int = option(
        None, "samples per new shard", required=True, flag_type=positive_int, check=at_least(1)
    )
    max_failure_ratio: float = failure_ratio()


@dataclass(frozen=True)
class Command:  # a subcommand: its name, its --help texts, its options
    name: str
    help: str
    description: str
    options: type[Any]


COMMANDS = (
    Command(
        "make-tiny-model",
        "write a tiny random-weight model in the Qwen-Image-Edit-2509 (or 2511) diffusers layout",
        "Write, offline and deterministically, a tiny random-weight model that diffusers' pipeline of the "
        "Qwen-Image-Edit family loads with from_pretrained (tests, demo, CI).",
        TinyModel,
    ),
    Command(
        "make-sample-data",
        "write small real editing datasets (one folder + data.jsonl per task)",
        "Write one folder per task (edit_single, compose_multi, text_to_image) with images and a data.jsonl in the "
        "extraction input format.",
        SampleData,
    ),
    Command(
        "inspect",
        "one line per sample: key, N, sizes, bucket, variants, instruction",
        "List samples of a shard (.tar URL) or of a task / meta directory.",
        Inspect,
    ),
    Command(
        "stats",
        "table per task and source count",
        "Samples, shards, bytes, aspect buckets, variants and recorded failures per task and number of sources.",
        Stats,
    ),
    Command(
        "verify",
        "check manifest against shards, member by member",
        "Counts, sizes and sha256 against the manifest; every member decodes (images, embeddings with the "
        "manifest's dtype and hidden size, JSON); no pickle members; unique keys. Exit code 1 when anything is "
        "wrong.",
        Verify,
    ),
    Command(
        "preview",
        "contact sheet PNG: sources -> target, instruction under each row",
        "Write a contact sheet of the first samples of a shard or task.",
        Preview,
    ),
    Command(
        "convert-legacy",
        "convert the original tool's output (JSONL + .pt embeddings) into shards, resumably",
        "Read the original tool's output JSONLs ({stem}_rank_{r}.jsonl, lines with source_image, edit_image, "
        "instructions and embeddings_tensor_{en,cn,droptext,en_inv,cn_inv,droptext_inv} .pt paths) and write "
        "shards + manifest without running the VLM. LEGACY_DIR is either one --output_jsonl_dir (JSONLs at its top "
        "or in per-rank sub-folders: one task, written to --output_dir) or a --train_data_meta_dir whose "
        "sub-folders are tasks (each written to --output_dir/<task>). Relative paths in the lines are resolved "
        "against the JSONL's folder and its parents up to LEGACY_DIR's parent. .pt files load with "
        "weights_only=True; bad lines go to _failures/. Interrupted? Rerun the same command: it resumes.",
        ConvertLegacy,
    ),
    Command(
        "reshard",
        "merge small shards or split large ones into a new task directory",
        "Copy a task into shards of --max_samples_per_shard samples with a new manifest (member bytes unchanged), "
        "optionally adding training copies. A sample that cannot be copied as stored goes to _failures/ and the "
        "copy goes on; interrupted? Rerun the same command: it resumes.",
        Reshard,
    ),
)
