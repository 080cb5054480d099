"""``python -m pipeline.train``: flags → :class:`TrainConfig` → the loop (or, with ``--data_only``, the loader alone).

Data path: tasks (``shards.tasks``) → per-(task, N) partitions and mixing
(``stream/dataset.py``) → batches (``stream/batching.py``) → torchdata's
``StatefulDataLoader`` (``stream/loader.py``), whose JSON state goes into every
checkpoint (``engine/checkpoint/``); the Trainer (``engine/trainer.py``) turns
batches into the flow-matching loss (``engine/step.py``, ``engine/flow.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from pipeline import families
from pipeline.common.logs import setup_logging
from pipeline.common.options import add_options, from_flags
from pipeline.common.process_group import distributed_env, leave_process_group
from pipeline.errors import USER_EXIT, DataError, UserError
from pipeline.train.config import OPTION_GROUPS, config_from_args, resolve_model_defaults, use_fsdp
from pipeline.train.config.data import StreamConfig
from pipeline.train.config.model import FlowConfig, LoraConfig, ModelConfig, OptimConfig
from pipeline.train.config.run import PlanOptions
from pipeline.train.engine.checkpoint.manager import NonFiniteState
from pipeline.train.engine.data_only import run_data_only
from pipeline.train.engine.step import NonFiniteTraining
from pipeline.train.engine.stopping import Stopped, StoppedOutsideSteps, stop_outside_steps
from pipeline.train.engine.trainer import Trainer
from pipeline.train.recipe import parse_with_recipe

log = logging.getLogger("pipeline.train")


def build_parser() -> argparse.ArgumentParser:
    """Every flag, derived from the option fields of the training configs (pipeline/train/config/)."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train a Qwen-Image-Edit transformer on WebDataset shards mixed by task and source count.",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="RECIPE.yaml",
        help="a YAML recipe of flags (flag names without dashes); flags on the command line override it",
    )
    for title, classes in OPTION_GROUPS:
        group = p.add_argument_group(title)
        for cls in classes:
            add_options(group, cls)
    return p


def print_plan(args: argparse.Namespace) -> int:
    from pipeline.train.engine.plan import (
        PlanRequest,
        build_on_meta,
        card_table,
        format_card_table,
        format_plan,
        memory_plan,
        read_configs,
    )

    if not args.pretrained_model_name_or_path:
        raise UserError(
            f"--plan needs --pretrained_model_name_or_path (a folder, or one of {', '.join(families.plan_names())})"
        )
    family = families.detect(args.pretrained_model_name_or_path)
    resolve_model_defaults(args)
    plan = from_flags(PlanOptions, args)
    model = from_flags(ModelConfig, args, lora=from_flags(LoraConfig, args) if args.use_peft_lora else None)
    stream, optim, flow = from_flags(StreamConfig, args), from_flags(OptimConfig, args), from_flags(FlowConfig, args)
    lora = model.lora or LoraConfig(target_modules=family.default_lora_targets)
    request = PlanRequest.from_configs(
        {"model": model, "lora": lora, "stream": stream, "flow": flow, "plan": plan},
        lora=model.lora is not None,
        fsdp=use_fsdp(args.parallelism),
        processes=plan.plan_processes or distributed_env().world,
        mixed_precision=optim.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
        batch_size=min(stream.batch_size, family.max_batch_size or stream.batch_size),  # 2.1 trains one at a time
        optimizer_bytes_per_param=2 if optim.use_8bit_adam else 8,
        cpu_offload=args.fsdp_cpu_offload,
        validation=bool(args.validation_jsonl),
        family=family.name,
    )
    transformer, vae = build_on_meta(*read_configs(model.pretrained), family.name)
    print(format_plan(memory_plan(transformer, vae, request)))
    gpus = max(request.processes, 8)
    print("\nwhich card: this run's batch, size, sources and text in every mode (planned, not measured on a GPU)")
    print(format_card_table(card_table(transformer, vae, request, gpus)))
    return 0


def json_safe(value):
    """``value`` with every non-finite float as None: ``run_summary.json`` stays valid JSON (no ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 a user's mistake (flag, path, recipe, data, run folder), one line; 1 a bug (with its
    traceback) or a run stopped by non-finite training; 128 + N stopped by signal N after saving a checkpoint."""
    setup_logging()
    stop_outside_steps()
    finished = False  # every rank reached the end: they leave the process group together
    trainer = None
    try:
        args = parse_with_recipe(build_parser(), sys.argv[1:] if argv is None else list(argv))
        if args.plan:
            return print_plan(args)
        config = config_from_args(args)
        if config.model is None:
            code = run_data_only(config)
            finished = True
            return code
        trainer = Trainer(config)
        trainer.setup()
        if config.export_checkpoint:
            outputs = trainer.export_checkpoint()  # collective under FSDP
            if trainer.accelerator.is_main_process:
                log.info("exported %s", outputs)
            finished = True
            return 0
        result = trainer.train()
        if trainer.accelerator.is_main_process:  # what the run measured, for scripts (benchmarks/gpu_check.py)
            summary = {k: v for k, v in result.items() if k != "losses"} | {"final_loss": result["losses"][-1:]}
            text = json.dumps(json_safe(summary), indent=1, allow_nan=False)
            (Path(config.output_dir) / "run_summary.json").write_text(text)
            log.info(
                "final loss %.4f; outputs %s",
                result["losses"][-1] if result["losses"] else float("nan"),
                result["outputs"],
            )
        finished = True
        return 0
    except Stopped as stop:
        log.warning("%s", stop)
        finished = True  # every rank saved together and stops here
        return stop.exit_code
    except StoppedOutsideSteps as stop:
        log.warning("%s", stop)
        return stop.exit_code
    except (NonFiniteTraining, NonFiniteState) as exc:
        log.error("%s", exc)
        return 1
    except (UserError, DataError) as exc:  # what the user gave us: one line
        log.error("%s", exc)
        return USER_EXIT
    finally:
        if trainer is not None:
            trainer.close()
        leave_process_group(together=finished)


if __name__ == "__main__":
    sys.exit(main())
