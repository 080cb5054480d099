"""``python -m pipeline.extract``: JSONL → per-task WebDataset shards with prompt embeddings (torchrun-ready)."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import timedelta

import torch

from pipeline.common import images as imaging
from pipeline.common.flags import (
    add_max_failure_ratio,
    add_prompt_style,
    add_shard_size,
    add_storage_options,
    add_train_copy_size,
    distributed_env,
)
from pipeline.common.logs import setup_logging
from pipeline.common.workers import exit_on_sigterm
from pipeline.extract.extractor import Extractor
from pipeline.shards.commits import LeaseHeld

log = logging.getLogger("pipeline.extract")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.extract",
        description="Encode the prompts of a JSONL of editing samples with the Qwen2.5-VL text encoder and write "
        "per-task WebDataset shards (images, instructions, bf16 embeddings) to a local path or fsspec URL. "
        "Run under torchrun for one process per GPU; rerun the same command to resume.",
    )
    p.add_argument("jsonl_path", help="input JSONL (local path or fsspec URL), one sample per line")
    p.add_argument("--output_dir", required=True, help="task directory to write: local path, s3://, gs://, ...")
    p.add_argument("--model_path", required=True, help="Qwen-Image-Edit(-2509) diffusers folder (text_encoder/, ...)")
    p.add_argument("--batch_size", type=int, default=4, help="prompts per encoder forward (a sample has 1-6)")
    p.add_argument(
        "--image_sample_size",
        type=int,
        default=512,
        help="scale of the --prompt_style firered crop table (the original tool's flag, same default); images are "
        "stored at original resolution and cropped at training time",
    )
    add_train_copy_size(p)
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers loading and preprocessing images")
    p.add_argument("--prefetch_factor", type=int, default=4, help="samples each worker prepares ahead")
    p.add_argument("--disable_inverse", action="store_true", help="do not store inverse-instruction embeddings")
    p.add_argument(
        "--t2i_mode",
        action="store_true",
        help="text-to-image data: every sample is encoded with the T2I template, source images are ignored; "
        "implies --disable_inverse",
    )
    add_prompt_style(p)
    p.add_argument(
        "--batching",
        choices=["padded", "exact"],
        default="padded",
        help="padded (default): prompts of similar length (64-token buckets) share a forward, padded with a "
        "mask: full batches, embeddings equal a one-prompt forward up to float rounding (a few bf16 ulps); "
        "exact: only prompts of equal token length share a forward, no padding, so on CPU every embedding is "
        "bit-identical to diffusers' encode_prompt (a CPU promise: cuBLAS does not guarantee bit-equality "
        "across batch shapes); batches are often half full",
    )
    add_shard_size(p)
    p.add_argument("--max_shard_bytes", type=int, default=1 << 30, help="start a new shard after this many bytes")
    add_max_failure_ratio(p)
    p.add_argument(
        "--max_image_pixels",
        type=int,
        default=imaging.DEFAULT_MAX_PIXELS,
        help="reject images with more pixels (decompression bombs); may exceed PIL's own limit (default: PIL's)",
    )
    p.add_argument(
        "--max_image_bytes",
        type=int,
        default=imaging.DEFAULT_MAX_BYTES,
        help="reject image files larger than this, checked before and while reading (default 64 MiB)",
    )
    p.add_argument(
        "--fetch_timeout",
        type=float,
        default=imaging.DEFAULT_FETCH_TIMEOUT,
        help="seconds to connect to and wait for data from http(s) and S3 image URLs (default 60)",
    )
    p.add_argument("--source_column", default="source_image", help="JSONL field with the source image(s)")
    p.add_argument("--target_column", default="target_image", help="JSONL field with the target image")
    add_storage_options(p)
    p.add_argument("--skip_embeddings", action="store_true", help="write image-only shards (online encoding)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda:N")
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="encoder compute dtype; auto = bfloat16 on CUDA, float32 on CPU (embeddings are stored as bfloat16)",
    )
    p.add_argument("--tmp_dir", default=None, help="local folder for shards being assembled (default: system temp)")
    p.add_argument("--queue_size", type=int, default=32, help="finished samples buffered for the shard writer")
    return p


def _init_distributed() -> tuple[int, int]:
    env = distributed_env()
    rank, world = env.rank, env.world
    if world > 1 and not torch.distributed.is_initialized():
        # gloo only synchronises the ranks at the end; the encoder itself is not distributed.
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=24))
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    exit_on_sigterm()
    rank, world = _init_distributed()
    try:
        extractor = Extractor(args, rank, world)
        extractor.run()
        _barrier(world)
        code = extractor.finish() if rank == 0 else 0
    except (FileNotFoundError, ValueError, LeaseHeld) as exc:  # a missing input, bad flags, a second run ...
        log.error("%s", exc)
        code = 2
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
