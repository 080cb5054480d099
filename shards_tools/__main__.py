"""``python -m shards_tools SUBCOMMAND``: one argparse entry point for the operator tools."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.common.logs import setup_logging
from pipeline.common.options import add_options, from_flags
from pipeline.common.workers import exit_on_sigterm
from pipeline.errors import USER_EXIT, DataError, UserError
from pipeline.shards.commits import failure_exit_code
from shards_tools.commands import (
    COMMANDS,
    ConvertLegacy,
    Inspect,
    Output,
    Preview,
    Reshard,
    SampleData,
    Stats,
    TinyModel,
    Verify,
)

log = logging.getLogger("shards_tools")


def _make_tiny_model(args: TinyModel) -> int:
    from pipeline.kit.tiny_model import make_tiny_model

    if args.family != "qwen_edit" and (args.size != "tiny" or args.variant != "2509"):
        raise UserError(f"--family {args.family} has one tiny model: --size and --variant are Qwen-Image-Edit's")
    out = make_tiny_model(args.out_dir, seed=args.seed, size=args.size, variant=args.variant, family=args.family)
    what = f"Qwen-Image-Edit-{args.variant}-layout" if args.family == "qwen_edit" else args.family
    log.info("%s %s model written to %s", args.size, what, out)
    return 0


def _make_sample_data(args: SampleData) -> int:
    from pipeline.kit.sample_data import make_sample_data

    for task, jsonl in make_sample_data(args.out_dir, samples=args.samples, seed=args.seed).items():
        log.info("task %-14s %s", task, jsonl)
    return 0


def _emit(args: Output, payload, human: str, failed: bool) -> int:
    print(json.dumps(payload, ensure_ascii=False, indent=1) if args.json else human)
    return 1 if failed else 0


def _storage(args: Output) -> dict:
    from pipeline.shards.storage import parse_storage_options

    target = getattr(args, "output_dir", None) or getattr(args, "url", None) or getattr(args, "legacy_dir", None)
    return parse_storage_options(args.storage_options, target)


def _inspect(args: Inspect) -> int:
    from shards_tools.summary import format_inspect, inspect_samples

    rows, problems = inspect_samples(args.url, _storage(args), args.limit)
    human = format_inspect(rows) + "".join(f"\nPROBLEM {p['shard']} [{p['key']}]: {p['problem']}" for p in problems)
    return _emit(args, {"samples": rows, "problems": problems}, human, bool(problems))


def _stats(args: Stats) -> int:
    from shards_tools.summary import format_stats, task_stats

    rows, problems = task_stats(args.url, _storage(args))
    human = format_stats(rows) + "".join(f"\nPROBLEM {p['task']} {p['shard']}: {p['problem']}" for p in problems)
    return _emit(args, {"rows": rows, "problems": problems}, human, bool(problems))


def _verify(args: Verify) -> int:
    from shards_tools.verify import format_problems, verify

    summary, problems = verify(args.url, _storage(args))
    return _emit(args, {**summary, "problems": problems}, format_problems(summary, problems), bool(problems))


def _preview(args: Preview) -> int:
    from shards_tools.sheet import preview

    count, problems = preview(args.url, args.out, args.samples, _storage(args))
    human = (f"wrote {args.out} ({count} samples)" if count else f"no usable sample; {args.out} not written") + "".join(
        f"\nPROBLEM {p['shard']} [{p['key']}]: {p['problem']}" for p in problems
    )
    return _emit(
        args, {"out": args.out if count else None, "samples": count, "problems": problems}, human, bool(problems)
    )


def _convert_legacy(args: ConvertLegacy) -> int:
    from shards_tools.convert import convert_legacy

    result = convert_legacy(args.legacy_dir, args.output_dir, _storage(args), args, args.layout)
    lines = [
        f"{name}: {m['samples']} sample(s) in {len(m['shards'])} shard(s); "
        f"{m['failures']} line(s) in _failures/ {m['failures_by_reason']}"
        for name, m in result["tasks"].items()
    ]
    lines += [f"{name}: REFUSED: {reason}" for name, reason in result["refused"].items()]
    human = f"{result['layout']} layout -> {args.output_dir}\n" + "\n".join(lines)
    payload = next(iter(result["tasks"].values())) if result["layout"] == "task" and result["tasks"] else result
    if result["refused"]:
        _emit(args, payload, human, True)
        return 2
    code = max(
        (failure_exit_code(f"task {name}", m["samples"], m["failures"], args.max_failure_ratio, f"{out}/_failures")
         for name, m, out in ((n, m, _task_output(args, result, n)) for n, m in result["tasks"].items())),
        default=0,
    )  # fmt: skip
    _emit(args, payload, human, False)
    return code


def _task_output(args: ConvertLegacy, result: dict, name: str) -> str:
    return args.output_dir if result["layout"] == "task" else f"{args.output_dir.rstrip('/')}/{name}"


def _reshard(args: Reshard) -> int:
    from shards_tools.reshard import reshard

    m = reshard(args.url, args.output_dir, _storage(args), args.max_samples_per_shard, args.train_copy_size)
    own = m["reshard"]
    human = (
        f"wrote {m['samples']} sample(s) in {len(m['shards'])} shard(s) to {args.output_dir}; "
        f"{own['failed']} could not be copied {own['failed_by_reason']}"
    )
    _emit(args, m, human, False)
    where = f"{args.output_dir.rstrip('/')}/_failures"
    return failure_exit_code("reshard", own["ok"], own["failed"], args.max_failure_ratio, where)


def build_parser() -> argparse.ArgumentParser:
    """One subparser per command, its flags derived from the command's option fields (``shards_tools/commands.py``)."""
    parser = argparse.ArgumentParser(
        prog="python -m shards_tools",
        description="Inspect and maintain shard datasets; write the offline tiny model and sample data.",
    )
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND", help="run one with --help")
    for command in COMMANDS:
        cmd = sub.add_parser(command.name, help=command.help, description=command.description)
        add_options(cmd, command.options)
        cmd.set_defaults(spec=command)
    return parser


HANDLERS = {
    "make-tiny-model": _make_tiny_model,
    "make-sample-data": _make_sample_data,
    "inspect": _inspect,
    "stats": _stats,
    "verify": _verify,
    "preview": _preview,
    "convert-legacy": _convert_legacy,
    "reshard": _reshard,
}


def main(argv: list[str] | None = None) -> int:
    flags = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if getattr(flags, "json", False) else logging.INFO)
    exit_on_sigterm()
    try:
        return HANDLERS[flags.spec.name](from_flags(flags.spec.options, flags))
    except (UserError, DataError) as exc:  # a wrong path, flag or task: one line; anything else is a bug
        log.error("%s", exc)
        return USER_EXIT


if __name__ == "__main__":
    sys.exit(main())
