"""``python -m shards_tools SUBCOMMAND``: one argparse entry point for the operator tools."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.logs import setup_logging

log = logging.getLogger("shards_tools")


def _make_tiny_model(args: argparse.Namespace) -> int:
    from pipeline.kit.tiny_model import make_tiny_model

    out = make_tiny_model(args.out_dir, seed=args.seed, size=args.size)
    log.info("%s Qwen-Image-Edit-2509-layout model written to %s", args.size, out)
    return 0


def _make_sample_data(args: argparse.Namespace) -> int:
    from pipeline.kit.sample_data import make_sample_data

    for task, jsonl in make_sample_data(args.out_dir, samples=args.samples, seed=args.seed).items():
        log.info("task %-14s %s", task, jsonl)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shards_tools",
        description="Inspect and maintain shard datasets; write the offline tiny model and sample data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    tiny = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight model in the Qwen-Image-Edit-2509 diffusers layout",
        description="Write, offline and deterministically, a tiny random-weight model that "
        "diffusers' QwenImageEditPlusPipeline.from_pretrained loads (tests, demo, CI).",
    )
    tiny.add_argument("out_dir", help="directory to write (created if missing)")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default: 0)")
    tiny.add_argument(
        "--size",
        choices=["tiny", "bench"],
        default="tiny",
        help="tiny: 4 MB, for tests and the demo (default); bench: ~60 MB, big enough that the encoder "
        "forward dominates CPU benchmarks",
    )
    tiny.set_defaults(func=_make_tiny_model)

    data = sub.add_parser(
        "make-sample-data",
        help="write small real editing datasets (one folder + data.jsonl per task)",
        description="Write one folder per task (edit_single, compose_multi, text_to_image) with "
        "images and a data.jsonl in the extraction input format.",
    )
    data.add_argument("out_dir", help="directory to write (created if missing)")
    data.add_argument("--samples", type=int, default=12, help="samples per task (default: 12)")
    data.add_argument("--seed", type=int, default=0, help="random seed for crops and scenes (default: 0)")
    data.set_defaults(func=_make_sample_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
