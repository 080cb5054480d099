"""``python -m pipeline.extract``: JSONL → per-task WebDataset shards with prompt embeddings (torchrun-ready)."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid

from pipeline.common.collective import Collective
from pipeline.common.flags import require_model_folder
from pipeline.common.logs import setup_logging
from pipeline.common.options import add_options, from_flags
from pipeline.common.process_group import distributed_env, join_process_group, leave_process_group
from pipeline.common.workers import exit_on_sigterm
from pipeline.errors import USER_EXIT, DataError, UserError
from pipeline.extract.config import ExtractConfig
from pipeline.extract.extractor import Extractor
from pipeline.shards.storage import Store

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


def _init_distributed(timeout_s: int) -> tuple[int, int]:
    env = distributed_env()
    # gloo only synchronises the ranks at the end (a long wait); the encoder itself is not distributed
    join_process_group("cpu", timeout_s=timeout_s)
    return env.rank, env.world


SHARED_CHECK = ".ranks-see.json"  # rank 0 writes a token here; every rank must read it back


def require_shared_output(store: Store, collective: Collective) -> None:
    """Every rank must write into the folder rank 0 does: rank 0's manifest lists only the shards it can see, so a
    node writing elsewhere (a relative --output_dir in each node's own working folder) would lose its work."""
    if collective.world == 1:
        return
    token = collective.text(uuid.uuid4().hex if collective.rank == 0 else None)
    if collective.rank == 0:
        store.write_json(SHARED_CHECK, {"token": token})
    collective.barrier()
    try:
        seen = store.read_json(SHARED_CHECK).get("token")
    except (OSError, ValueError, AttributeError):  # missing, unreadable, or not an object: not rank 0's file
        seen = None
    collective.require_seen(
        seen == token,
        f"{store.url(SHARED_CHECK)}, which rank 0 has just written: --output_dir must be one folder (or object-store "
        "prefix) that every node writes to; a relative path names each node's own working folder",
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        config = config_from_argv(argv)
    except (UserError, DataError) as exc:  # a refused flag: one line, before any process group or lease
        log.error("%s", exc)
        return USER_EXIT
    exit_on_sigterm()
    rank, world = _init_distributed(config.ddp_timeout)
    collective = Collective(rank, world, config.ddp_timeout)
    finished = False  # every rank reached the end: they leave the process group together (rank 0 wrote the manifest)
    try:
        if not config.skip_embeddings:
            require_model_folder(config.model_path, "--model_path")
        extractor = Extractor(config, rank, world)
        require_shared_output(extractor.store, collective)
        extractor.run()
        with collective.phase("waiting for every rank to finish its share of the input"):
            collective.barrier()
        with collective.phase("writing the manifests and the summary (rank 0)"):
            code = extractor.finish() if rank == 0 else 0
            collective.barrier()
        finished = True
    except (UserError, DataError) as exc:  # a missing input, bad flags, a second run ...
        log.error("%s", exc)
        code = USER_EXIT
    finally:
        leave_process_group(together=finished)
    return code


if __name__ == "__main__":
    sys.exit(main())
