"""The Trainer: one rank's run under accelerate, top-down — take the folder, build, resume, loop, export.

Each concern has its own room (``run_dir``, ``checkpoint``, ``parallel``, ``step``, ``stopping``, export and
validation); the trainer strings them together, with no DDP/FSDP branch.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline import families
from pipeline.common.collective import Collective
from pipeline.train import recipe as recipes
from pipeline.train.config import TrainConfig
from pipeline.train.engine import model as models
from pipeline.train.engine import parallel
from pipeline.train.engine.checkpoint import folders
from pipeline.train.engine.checkpoint import manager as ckpt
from pipeline.train.engine.checkpoint import parts as parts_
from pipeline.train.engine.export import export_weights
from pipeline.train.engine.metrics import LossBoard, group_grad_norms, step_logs
from pipeline.train.engine.run_dir import RunDirectory, run_names
from pipeline.train.engine.step import TRAINER_STATE, NonFinitePolicy, batch_loss, clip_gradients, encode_online
from pipeline.train.engine.stopping import Stopped, StopRequest
from pipeline.train.stream.loader import build_dataset, build_loader, next_batch, stop_workers
from pipeline.train.stream.startup import tasks_for_model
from pipeline.train.stream.trace import TraceWriter

log = logging.getLogger("pipeline.train")


class Trainer:
    """One rank's training run under accelerate, configured by a :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.accelerator = parallel.make_accelerator(config)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        if config.optim.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.collective = Collective(self.rank, self.world, config.ddp_timeout)
        self.run = RunDirectory(config.output_dir, self.collective, run_names(config))
        self.parallel = parallel.strategy(config.fsdp, acc, acc.mixed_precision, config.fsdp_cpu_offload)
        self.nonfinite = NonFinitePolicy(config.optim.max_nonfinite_steps)
        self.stop = StopRequest()
        self.recipe_changes: dict[str, Any] = {}  # settings changed since config.yaml (resume only)

    # ---- set-up: the folder and the checkpoint to resume are decided before anything is built or loaded ----------
    def setup(self) -> None:
        from diffusers.optimization import get_scheduler

        config, acc = self.config, self.accelerator
        model, optim, checkpoint = config.model, config.optim, config.checkpoint
        exporting = config.export_checkpoint is not None
        self.run.open(checkpoint.resume_from, checkpoint.overwrite, fresh_check=not exporting)
        self.checkpoints = ckpt.CheckpointManager(
            config.output_dir, self.collective, run=self.run,
            mode={"world_size": self.world, "lora": model.lora is not None, "fsdp": config.fsdp},
            every=checkpoint.every, total_limit=checkpoint.total_limit, trace_path=config.data.trace_path,
        )  # fmt: skip
        if exporting:
            self.checkpoints.choose_export(Path(config.export_checkpoint))
        else:
            self.checkpoints.choose(checkpoint.resume_from, self.check_recipe)
        self.family = families.detect(model.pretrained)
        # the tasks, read and checked against the model's family before any weight loads
        tasks = None if exporting else tasks_for_model(config.data, config.stream, self.family)
        self.validator = None
        if config.validation is not None and not exporting:
            from pipeline.train.engine.validation import Validator

            self.validator = Validator(
                config.validation, model.pretrained, config.stream.image_sample_size, config.output_dir,
                config.stream.storage_options, self.family,
            )  # fmt: skip
            # this rank's rows; the text encoder is loaded and freed before the transformer arrives
            rows = self.validator.rows_of(self.rank, self.world, self.parallel.renders_every_row())
            self.validator.prepare(acc.device, rows)
        built = models.build_training_models(
            model, acc.mixed_precision, optim.learning_rate, config.flow.seed, acc.device, sharded=config.fsdp,
            family=self.family,
        )  # fmt: skip
        self.vae, self.scheduler, groups = built.vae.to(acc.device), built.scheduler, built.groups
        if optim.scale_lr:
            for g in groups:
                g["lr"] *= optim.gradient_accumulation_steps * config.stream.batch_size * self.world
        self.transformer, self.optimizer = self.parallel.prepare(
            built.transformer, groups, lambda gs: models.make_optimizer(gs, optim), built.weights
        )
        self.lr_scheduler = get_scheduler(
            optim.lr_scheduler, self.optimizer, num_warmup_steps=optim.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )  # fmt: skip
        self.dataset = build_dataset(config.data, config.stream, self.rank, self.world, tasks)
        self.loader = build_loader(self.dataset, config.data)
        self.encoder = None
        if model.condition_encoder_mode == "sync":
            self.builder = self.family.prompt_builder(
                model.pretrained, model.prompt_style, config.stream.image_sample_size
            )
            self.encoder = self.family.prompt_encoder(model.pretrained, str(acc.device), "auto")
        self.losses = LossBoard(list(self.dataset.tasks), config.tracking.loss_window)
        self.register_parts()
        if config.tracking.report_to != "none":
            acc.init_trackers(config.tracking.project_name, config=config.scalars())

    def check_recipe(self, step: int) -> None:
        """Resuming, before any weight loads: every setting against ``config.yaml`` (what changed is recorded)."""
        config = self.config
        self.recipe_changes = recipes.check_resume_recipe(
            config.output_dir, self.recipe, step, config.allow_recipe_change
        )

    @functools.cached_property
    def recipe(self) -> dict[str, Any]:
        """Every resolved flag, with the model identified by content (what ``config.yaml`` keeps)."""
        return recipes.with_model_identity(self.config.recipe)

    def register_parts(self) -> None:
        """Every part of the run's state, by name; each saves and loads its own files (no pickle)."""
        config, rank = self.config, self.rank
        parts = {
            "model_and_optimizer": self.parallel.weights_part(rank),
            "scheduler": parts_.JsonPart(
                "scheduler.json", self.lr_scheduler.state_dict, self.lr_scheduler.load_state_dict, rank
            ),
            "loop": parts_.JsonPart(
                TRAINER_STATE, self.nonfinite.state_dict, self.nonfinite.load_state_dict, rank, optional=True
            ),
            "rng": parts_.RngPart(rank),
            "data": parts_.DataPart(self.loader, rank, self.world),
        }
        if config.model.lora is not None:  # a LoRA file that loads as it is, in every checkpoint
            parts["lora_files"] = parts_.LoraFiles(lambda folder: self.export(folder, checked=True))
        self.checkpoints.register(parts, finite=lambda: models.first_nonfinite(self.transformer, self.optimizer))

    # ---- the step ---------------------------------------------------------------------------------------------
    def train_step(self, step: int, batches, trace: TraceWriter) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` batches; a non-finite gradient skips the update.

        The skip decision reads the global gradient norm (the same on every rank
        after the all-reduce), so all ranks skip together.
        """
        config, acc, strategy = self.config, self.accelerator, self.parallel
        ga = config.optim.gradient_accumulation_steps
        waited, grad_norm, rows, extra = 0.0, 0.0, [], {}
        for micro in range(ga):
            loader_step = step * ga + micro
            batch, wait = next_batch(batches, loader_step)
            waited += wait
            trace.write(loader_step + 1, batch)
            if step == 0 and micro == 0 and acc.is_main_process:
                from pipeline.train.engine.validation import first_batch_sheet

                first_batch_sheet(batch, Path(config.output_dir) / "first_batch.png")
            if self.encoder is not None:
                encode_online(batch, self.builder, self.encoder)
            last = micro == ga - 1
            with strategy.accumulating(last):
                loss = batch_loss(
                    batch, self.transformer, self.vae, self.scheduler, config.flow, self.rank, self.world, loader_step,
                    acc.device, self.family,
                )  # fmt: skip
                strategy.backward(loss, ga)
                synced = strategy.syncs(last)
                if synced:
                    if config.tracking.report_model_info:
                        extra = group_grad_norms(self.transformer.named_parameters())
                    strategy.unscale()  # fp16: the norm of the true gradients
                    params = [p for p in self.transformer.parameters() if p.requires_grad]
                    grad_norm, extra["clip_bound"] = clip_gradients(params, step, config.optim)
                    if math.isfinite(grad_norm):
                        self.nonfinite.finite()
                        self.optimizer.step()
                    else:
                        self.nonfinite.skip(step + 1, grad_norm)
                strategy.zero_grad(synced)
            rows.append((batch["task"], batch["num_sources"], loss.detach().item()))
        self.lr_scheduler.step()
        # every rank's (task, N, loss): the logged loss is their mean, the running means are per task and per N
        gathered = self.losses.encode(rows)
        if self.world > 1:
            gathered = acc.gather(gathered.to(acc.device)).cpu()
        logs = self.losses.add(gathered)
        return {**logs, "rank_loss": sum(r[2] for r in rows) / ga, "grad_norm": grad_norm, "waited": waited, **extra}

    # ---- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        config, acc = self.config, self.accelerator
        start = self.checkpoints.load()
        acc.wait_for_everyone()
        if acc.is_main_process:
            recipes.write_recipe(config.output_dir, self.recipe, start, self.recipe_changes)
        trace = TraceWriter(config.data.trace_path)
        batches = self.batches = iter(self.loader)
        bar = tqdm(total=config.max_train_steps, initial=start, desc="train", disable=not acc.is_main_process)
        losses, step_seconds, wait_total = [], [], 0.0
        per_step = config.stream.batch_size * config.optim.gradient_accumulation_steps * self.world
        self.stop.install()
        try:
            for step in range(start, config.max_train_steps):
                started = time.perf_counter()
                result = self.train_step(step, batches, trace)
                elapsed = time.perf_counter() - started
                wait_total += result["waited"]
                step_seconds.append(elapsed)
                losses.append(result["loss"])
                done = step + 1
                if done == config.max_train_steps:
                    self.nonfinite.check_last(done, result["loss"])
                logs = step_logs(result, self.lr_scheduler.get_last_lr()[0], per_step, elapsed, self.nonfinite.steps)
                acc.log(logs, step=done)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", sps=f"{logs['samples_per_s']:.2f}")
                bar.update(1)
                saved = self.checkpoints.due(done, config.max_train_steps)
                if saved:
                    self.checkpoints.save(done)
                if self.validator is not None and self.validator.due(done, config.max_train_steps):
                    with self.collective.phase(f"validation images at step {done} (rank 0 writes the sheet)"):
                        self.validator.run(done, self.parallel, self.vae, acc)
                        self.collective.barrier()
                signum = self.stop.agreed(self.collective)
                if signum and done < config.max_train_steps:
                    folder = folders.final_dir(config.output_dir, done) if saved else self.checkpoints.save(done)
                    self.stop.ignore_more()
                    raise Stopped(done, signum, folder)
        finally:
            if self.stop.received is None:  # once stopping, later signals are ignored until the exit
                self.stop.restore()
            bar.close()
            trace.close()
        acc.wait_for_everyone()
        outputs = self.export(config.output_dir)
        acc.end_training()
        return {
            "losses": losses, "data_wait_fraction": wait_total / max(sum(step_seconds), 1e-9), "outputs": outputs,
            "samples": per_step * len(step_seconds), "nonfinite_steps": self.nonfinite.steps,
            "step_seconds": step_seconds, "world_size": self.world, "fsdp": self.config.fsdp,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }  # fmt: skip

    def export_checkpoint(self) -> dict[str, str]:
        """``--export_checkpoint``: the checkpoint checked intact, loaded, exported into ``--output_dir``."""
        self.checkpoints.load()
        return self.export(self.config.output_dir)

    def export(self, out_dir: str | Path, checked: bool = False) -> dict[str, str]:
        """Collective: diffusers files on rank 0 (gathered from the shards under FSDP); ``{}`` on other ranks.
        Refused, like a checkpoint, when the weights are not finite (``checked``: the save that calls it has just
        checked them)."""
        problem = None if checked else models.first_nonfinite(self.transformer, self.optimizer)
        if not checked and self.collective.any(problem is not None):
            raise ckpt.NonFiniteState(
                f"{problem or 'another rank’s share of the weights'} is not finite (NaN/Inf): nothing exported to "
                f"{out_dir}"
            )
        with self.collective.phase(f"exporting the weights to {out_dir} (rank 0 writes them)"):
            outputs = export_weights(
                self.parallel.unwrapped(), self.config.model.lora, out_dir, self.parallel.export_names(),
                self.accelerator.is_main_process, self.family,
            )  # fmt: skip
            self.collective.barrier()
        return outputs

    def close(self) -> None:
        """Whatever happened: the loader's workers shut down (not left to Python's exit), the lease released."""
        stop_workers(getattr(self, "batches", None))
        self.run.close()
