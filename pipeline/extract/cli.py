"""``python -m pipeline.extract``: JSONL → per-task WebDataset shards with prompt embeddings (torchrun-ready)."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from pipeline.common.flags import distributed_env, join_process_group, leave_process_group, require_model_folder
from pipeline.common.logs import setup_logging
from pipeline.common.options import add_options, from_flags
from pipeline.common.workers import exit_on_sigterm
from pipeline.errors import USER_EXIT, DataError, UserError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.extractor import Extractor

log = logging.getLogger("pipeline.extract")


def build_parser() -> argparse.ArgumentParser:
    """Every flag, derived from :class:`ExtractConfig`'s fields."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline.extract",
        description="Encode the prompts of a JSONL of editing samples with the Qwen2.5-VL text encoder and write "
        "per-task WebDataset shards (images, instructions, bf16 embeddings) to a local path or fsspec URL. "
        "Run under torchrun for one process per GPU; rerun the same command to resume.",
    )
    add_options(p, ExtractConfig)
    return p


def config_from_argv(argv: list[str] | None = None) -> ExtractConfig:
    return from_flags(ExtractConfig, build_parser().parse_args(argv))


def _init_distributed() -> tuple[int, int]:
    env = distributed_env()
    # gloo only synchronises the ranks at the end (a long wait); the encoder itself is not distributed
    join_process_group("cpu", timeout_s=24 * 3600)
    return env.rank, env.world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    config = config_from_argv(argv)
    setup_logging()
    exit_on_sigterm()
    rank, world = _init_distributed()
    finished = False  # every rank reached the end: they leave the process group together (rank 0 wrote the manifest)
    try:
        if not config.skip_embeddings:
            require_model_folder(config.model_path, "--model_path")
        extractor = Extractor(config, rank, world)
        extractor.run()
        _barrier(world)
        code = extractor.finish() if rank == 0 else 0
        finished = True
    except (UserError, DataError) as exc:  # a missing input, bad flags, a second run ...
        log.error("%s", exc)
        code = USER_EXIT
    finally:
        leave_process_group(together=finished)
    return code


if __name__ == "__main__":
    sys.exit(main())
