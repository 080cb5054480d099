"""``python -m shards_tools SUBCOMMAND``: one argparse entry point for the operator tools."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.common.flags import add_max_failure_ratio, add_shard_size, add_storage_options, add_train_copy_size
from pipeline.common.logs import setup_logging
from pipeline.common.workers import exit_on_sigterm
from pipeline.errors import USER_EXIT, DataError, UserError
from pipeline.shards.commits import failure_exit_code

log = logging.getLogger("shards_tools")


def _make_tiny_model(args: argparse.Namespace) -> int:
    from pipeline.kit.tiny_model import make_tiny_model

    if args.family != "qwen_edit" and (args.size != "tiny" or args.variant != "2509"):
        raise UserError(f"--family {args.family} has one tiny model: --size and --variant are Qwen-Image-Edit's")
    out = make_tiny_model(args.out_dir, seed=args.seed, size=args.size, variant=args.variant, family=args.family)
    what = f"Qwen-Image-Edit-{args.variant}-layout" if args.family == "qwen_edit" else args.family
    log.info("%s %s model written to %s", args.size, what, out)
    return 0


def _make_sample_data(args: argparse.Namespace) -> int:
    from pipeline.kit.sample_data import make_sample_data

    for task, jsonl in make_sample_data(args.out_dir, samples=args.samples, seed=args.seed).items():
        log.info("task %-14s %s", task, jsonl)
    return 0


def _emit(args: argparse.Namespace, payload, human: str, failed: bool) -> int:
    print(json.dumps(payload, ensure_ascii=False, indent=1) if args.json else human)
    return 1 if failed else 0


def _storage(args: argparse.Namespace) -> dict:
    from pipeline.shards.storage import parse_storage_options

    target = getattr(args, "output_dir", None) or getattr(args, "url", None) or getattr(args, "legacy_dir", None)
    return parse_storage_options(args.storage_options, target)


def _inspect(args: argparse.Namespace) -> int:
    from shards_tools.summary import format_inspect, inspect_samples

    rows, problems = inspect_samples(args.url, _storage(args), args.limit)
    human = format_inspect(rows) + "".join(f"\nPROBLEM {p['shard']} [{p['key']}]: {p['problem']}" for p in problems)
    return _emit(args, {"samples": rows, "problems": problems}, human, bool(problems))


def _stats(args: argparse.Namespace) -> int:
    from shards_tools.summary import format_stats, task_stats

    rows, problems = task_stats(args.url, _storage(args))
    human = format_stats(rows) + "".join(f"\nPROBLEM {p['task']} {p['shard']}: {p['problem']}" for p in problems)
    return _emit(args, {"rows": rows, "problems": problems}, human, bool(problems))


def _verify(args: argparse.Namespace) -> int:
    from shards_tools.verify import format_problems, verify

    summary, problems = verify(args.url, _storage(args))
    return _emit(args, {**summary, "problems": problems}, format_problems(summary, problems), bool(problems))


def _preview(args: argparse.Namespace) -> int:
    from shards_tools.sheet import preview

    count, problems = preview(args.url, args.out, args.samples, _storage(args))
    human = (f"wrote {args.out} ({count} samples)" if count else f"no usable sample; {args.out} not written") + "".join(
        f"\nPROBLEM {p['shard']} [{p['key']}]: {p['problem']}" for p in problems
    )
    return _emit(
        args, {"out": args.out if count else None, "samples": count, "problems": problems}, human, bool(problems)
    )


def _convert_legacy(args: argparse.Namespace) -> int:
    from shards_tools.convert import ConvertOptions, convert_legacy

    options = ConvertOptions(
        max_samples_per_shard=args.max_samples_per_shard,
        null_embedding=args.null_embedding,
        model_path=args.model_path,
        path_map=[_path_map(text) for text in args.path_map],
        train_copy_size=args.train_copy_size,
    )
    result = convert_legacy(args.legacy_dir, args.output_dir, _storage(args), options, args.layout)
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


def _task_output(args: argparse.Namespace, result: dict, name: str) -> str:
    return args.output_dir if result["layout"] == "task" else f"{args.output_dir.rstrip('/')}/{name}"


def _path_map(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old:
        raise UserError(f"--path_map expects OLD_PREFIX=NEW_PREFIX, got {text!r}")
    return old, new


def _reshard(args: argparse.Namespace) -> int:
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


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_storage_options(sub)


def build_parser() -> argparse.ArgumentParser:
    from shards_tools.convert import LAYOUTS

    parser = argparse.ArgumentParser(
        prog="python -m shards_tools",
        description="Inspect and maintain shard datasets; write the offline tiny model and sample data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND", help="run one with --help")

    tiny = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight model in the Qwen-Image-Edit-2509 (or 2511) diffusers layout",
        description="Write, offline and deterministically, a tiny random-weight model that "
        "diffusers' pipeline of the Qwen-Image-Edit family loads with from_pretrained (tests, demo, CI).",
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
    tiny.add_argument(
        "--variant",
        choices=["2509", "2511"],
        default="2509",
        help="2509 (default; also the layout of FireRed-Image-Edit 1.0/1.1) or 2511 (zero_cond_t: the source "
        "images' tokens are modulated as at t = 0)",
    )
    tiny.add_argument(
        "--family",
        choices=["qwen_edit", "qwen_image21"],
        default="qwen_edit",
        help="qwen_edit (default: Qwen-Image-Edit, --variant picks 2509 or 2511) or qwen_image21 (Qwen-Image 2.1: "
        "Qwen3-VL, the single-stream DiT, the RGBA VAE)",
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

    cmd = sub.add_parser(
        "inspect",
        help="one line per sample: key, N, sizes, bucket, variants, instruction",
        description="List samples of a shard (.tar URL) or of a task / meta directory.",
    )
    cmd.add_argument("url", help="shard URL, task directory or meta directory (local or fsspec URL)")
    cmd.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    _common(cmd)
    cmd.set_defaults(func=_inspect)

    cmd = sub.add_parser(
        "stats",
        help="table per task and source count",
        description="Samples, shards, bytes, aspect buckets, variants and recorded failures per "
        "task and number of sources.",
    )
    cmd.add_argument("url", help="task directory or meta directory")
    _common(cmd)
    cmd.set_defaults(func=_stats)

    cmd = sub.add_parser(
        "verify",
        help="check manifest against shards, member by member",
        description="Counts, sizes and sha256 against the manifest; every member decodes (images, "
        "embeddings with the manifest's dtype and hidden size, JSON); no pickle members; unique "
        "keys. Exit code 1 when anything is wrong.",
    )
    cmd.add_argument("url", help="task directory or meta directory")
    _common(cmd)
    cmd.set_defaults(func=_verify)

    cmd = sub.add_parser(
        "preview",
        help="contact sheet PNG: sources -> target, instruction under each row",
        description="Write a contact sheet of the first samples of a shard or task.",
    )
    cmd.add_argument("url", help="shard URL, task directory or meta directory")
    cmd.add_argument("--out", required=True, help="PNG file to write")
    cmd.add_argument("--samples", type=int, default=16, help="rows (default 16)")
    _common(cmd)
    cmd.set_defaults(func=_preview)

    cmd = sub.add_parser(
        "convert-legacy",
        help="convert the original tool's output (JSONL + .pt embeddings) into shards, resumably",
        description="Read the original tool's output JSONLs ({stem}_rank_{r}.jsonl, lines with source_image, "
        "edit_image, instructions and embeddings_tensor_{en,cn,droptext,en_inv,cn_inv,droptext_inv} .pt paths) and "
        "write shards + manifest without running the VLM. LEGACY_DIR is either one --output_jsonl_dir (JSONLs at "
        "its top or in per-rank sub-folders: one task, written to --output_dir) or a --train_data_meta_dir whose "
        "sub-folders are tasks (each written to --output_dir/<task>). Relative paths in the lines are resolved "
        "against the JSONL's folder and its parents up to LEGACY_DIR's parent. .pt files load with "
        "weights_only=True; bad lines go to _failures/. Interrupted? Rerun the same command: it resumes.",
    )
    cmd.add_argument("legacy_dir", metavar="LEGACY_DIR", help="the original tool's output folder (local or fsspec URL)")
    cmd.add_argument("--output_dir", required=True, help="new task directory, or meta directory for a meta layout")
    cmd.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="task: LEGACY_DIR is one task; meta: each sub-folder is a task; auto (default): task when LEGACY_DIR "
        "holds JSONLs or only per-rank sub-folders (rank0, 003) do, else meta",
    )
    cmd.add_argument(
        "--null_embedding",
        default=None,
        help="the empty-prompt (T2I template) embedding file the original tool ships (.pt, loaded with "
        "weights_only=True, or .npy): the null embedding of tasks with text-to-image lines",
    )
    cmd.add_argument(
        "--model_path",
        default=None,
        help="Qwen-Image-Edit(-2509) folder: compute the null embedding with our encoder when a task needs one "
        "and --null_embedding is not given; also recorded as the tasks' encoder",
    )
    cmd.add_argument(
        "--path_map",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rewrite paths starting with OLD to start with NEW (files moved since extraction); repeatable",
    )
    add_train_copy_size(cmd)
    add_shard_size(cmd)
    add_max_failure_ratio(cmd)
    _common(cmd)
    cmd.set_defaults(func=_convert_legacy)

    cmd = sub.add_parser(
        "reshard",
        help="merge small shards or split large ones into a new task directory",
        description="Copy a task into shards of --max_samples_per_shard samples with a new manifest "
        "(member bytes unchanged), optionally adding training copies. A sample that cannot be copied as stored "
        "goes to _failures/ and the copy goes on; interrupted? Rerun the same command: it resumes.",
    )
    cmd.add_argument("url", help="task directory")
    cmd.add_argument("--output_dir", required=True, help="new task directory")
    add_train_copy_size(cmd, replaces=True)
    add_shard_size(cmd, default=None)
    add_max_failure_ratio(cmd)
    _common(cmd)
    cmd.set_defaults(func=_reshard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if getattr(args, "json", False) else logging.INFO)
    exit_on_sigterm()
    try:
        return args.func(args)
    except (UserError, DataError) as exc:  # a wrong path, flag or task: one line; anything else is a bug
        log.error("%s", exc)
        return USER_EXIT


if __name__ == "__main__":
    sys.exit(main())
