"""The Trainer: one rank's run under accelerate — set-up, ``train_step``, the loop, checkpoints, validation.

It wires the pieces that live in their own modules: the loss, clipping and the
non-finite policy (``step``), the checkpoint manager over named parts built from
what they save (``checkpoint``), FSDP2 (``parallel``), export (``export``),
validation images (``validation``).  The data-only run is ``data_only``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.train import recipe as recipes
from pipeline.train.config import TrainConfig
from pipeline.train.engine import checkpoint as ckpt
from pipeline.train.engine import model as models
from pipeline.train.engine import parallel
from pipeline.train.engine.export import export_weights
from pipeline.train.engine.metrics import LossBoard, group_grad_norms
from pipeline.train.engine.parallel import use_fsdp, without_accelerate_fsdp
from pipeline.train.engine.step import (
    TRAINER_STATE,
    NonFinitePolicy,
    batch_loss,
    clip_gradients,
    encode_online,
)
from pipeline.train.stream.loader import TraceWriter, build_dataset, build_loader, next_batch, truncate_trace

log = logging.getLogger("pipeline.train")


class Trainer:
    """One rank's training run under accelerate, configured by a :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        # decided before the Accelerator exists: under FSDP it must not build its own FSDP plugin
        self.fsdp = use_fsdp(config.parallelism)
        check_optimizer(config.optim.use_8bit_adam, self.fsdp)
        if config.fsdp_cpu_offload and not self.fsdp:
            raise ValueError("--fsdp_cpu_offload offloads FSDP's shards: add --parallelism fsdp (on one GPU too)")
        if self.fsdp and config.model and config.model.lora and config.model.lora.base_weight_dtype != "auto":
            raise ValueError(  # FSDP's param dtype would cast the fp8 weights to bf16 without their scales
                "--base_weight_dtype float8_e4m3fn works with DDP or one process, not FSDP (each GPU holds the fp8 "
                "base whole, ~20 GB for the 20B DiT)"
            )
        use_cpu = not torch.cuda.is_available()
        tracking = config.tracking
        report_to = None if tracking.report_to == "none" else tracking.report_to.split(",")
        out = config.output_dir
        with without_accelerate_fsdp(self.fsdp):
            self.accelerator = self._accelerator(config, report_to, out, tracking, use_cpu)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        if config.optim.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.nonfinite = NonFinitePolicy(config.optim.max_nonfinite_steps)

    @staticmethod
    def _accelerator(config: TrainConfig, report_to, out, tracking, use_cpu: bool):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        return Accelerator(
            mixed_precision=config.optim.mixed_precision,
            gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=out, logging_dir=str(Path(out) / tracking.logging_dir)),
            cpu=use_cpu,
            # the last block's text-stream outputs do not reach the loss, so some parameters get no gradient
            # the transformer's buffers are constants (rope frequencies; an fp8 base's weights and scales, ~20 GB
            # for the 20B DiT): DDP's default would broadcast them from rank 0 before every forward
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)],
        )

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        from diffusers.optimization import get_scheduler

        config, acc = self.config, self.accelerator
        model, optim = config.model, config.optim
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        self.validator = None
        if config.validation is not None and not config.export_checkpoint:
            from pipeline.train.engine.validation import Validator

            self.validator = Validator(
                config.validation,
                model.pretrained,
                config.stream.image_sample_size,
                config.output_dir,
                config.stream.storage_options,
            )
            # this rank's rows; the text encoder is loaded and freed before the transformer arrives
            self.validator.prepare(acc.device, self.validator.rows_of(self.rank, self.world, self.fsdp))
        transformer, vae, self.scheduler, groups = models.build_training_models(
            model, acc.mixed_precision, optim.learning_rate, config.flow.seed
        )
        self.vae = vae.to(acc.device)
        if optim.scale_lr:
            for g in groups:
                g["lr"] *= optim.gradient_accumulation_steps * config.stream.batch_size * self.world
        if self.fsdp:  # sharding replaces the parameters: find each group's again by name
            names = {id(p): n for n, p in transformer.named_parameters()}
            group_names = [[names[id(p)] for p in g["params"]] for g in groups]
            parallel.shard_transformer(transformer, acc.mixed_precision, acc.device, config.fsdp_cpu_offload)
            params = dict(transformer.named_parameters())
            groups = [{**g, "params": [params[n] for n in ns]} for g, ns in zip(groups, group_names, strict=True)]
        optimizer = self._optimizer(groups)
        self.lr_scheduler = get_scheduler(
            optim.lr_scheduler,
            optimizer,
            num_warmup_steps=optim.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )
        if self.fsdp:  # our own FSDP2 wrapping (see parallel.py); accelerate does not touch the model
            self.transformer, self.optimizer = transformer, optimizer
            self.trainable = parallel.trainable_names(transformer)
        else:
            self.transformer, self.optimizer = acc.prepare(transformer, optimizer)
        self.dataset = build_dataset(config.data, config.stream, self.rank, self.world)
        self.loader = build_loader(self.dataset, config.data)
        self.encoder = None
        if model.condition_encoder_mode == "sync":
            from pipeline.common.encoder import PromptBuilder, PromptEncoder

            self.builder = PromptBuilder(model.pretrained, model.prompt_style, config.stream.image_sample_size)
            self.encoder = PromptEncoder(model.pretrained, str(acc.device), "auto")
        self.losses = LossBoard(list(self.dataset.tasks), config.tracking.loss_window)
        self.checkpointer = self._checkpointer()
        if config.tracking.report_to != "none":
            acc.init_trackers(config.tracking.project_name, config=config.scalars())

    def _optimizer(self, groups):
        optim = self.config.optim
        kwargs = {
            "betas": (optim.adam_beta1, optim.adam_beta2),
            "weight_decay": optim.adam_weight_decay,
            "eps": optim.adam_epsilon,
        }
        if optim.use_8bit_adam:
            import bitsandbytes as bnb  # optional dependency

            return bnb.optim.AdamW8bit(groups, **kwargs)
        if optim.use_came:
            from came_pytorch import CAME  # optional dependency

            return CAME(groups, weight_decay=optim.adam_weight_decay)
        # fused on CUDA: one kernel per step, no per-parameter temporaries (foreach would allocate a copy of the
        # trainable parameters in fp32 at every step); the plan counts on it
        on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])  # not under CPU offload
        return torch.optim.AdamW(groups, **kwargs, fused=on_cuda or None)

    # ---- checkpoints -------------------------------------------------------------------------
    def _checkpointer(self) -> ckpt.Checkpointer:
        """Every part of the run's state, by name; each saves and loads its own files (no pickle)."""
        config, acc = self.config, self.accelerator
        if self.fsdp:
            weights = ckpt.FSDPShards(self.transformer, self.optimizer, self.trainable)
        else:
            weights = ckpt.ReplicatedWeights(acc.unwrap_model(self.transformer), self.optimizer, self.rank)
        parts = {
            "model_and_optimizer": weights,
            "scheduler": ckpt.JsonPart(
                "scheduler.json", self.lr_scheduler.state_dict, self.lr_scheduler.load_state_dict, self.rank
            ),
            "loop": ckpt.JsonPart(
                TRAINER_STATE, self.nonfinite.state_dict, self.nonfinite.load_state_dict, self.rank, optional=True
            ),
            "rng": ckpt.RngPart(self.rank),
            "data": ckpt.DataPart(self.loader, self.rank, self.world),
        }
        if config.model.lora is not None:  # a LoRA file that loads as it is, in every checkpoint
            parts["lora_files"] = ckpt.LoraFiles(self.export)
        marker = {"world_size": self.world, "lora": config.model.lora is not None, "fsdp": self.fsdp}
        return ckpt.Checkpointer(
            config.output_dir,
            self.rank,
            acc.wait_for_everyone,
            parts,
            marker,
            config.checkpoint.total_limit,
            self.world,
        )

    def save(self, step: int) -> Path:
        return self.checkpointer.save(step)

    def load(self, folder: Path) -> int:
        marker = ckpt.read_marker(folder)
        if bool(marker.get("fsdp")) != self.fsdp:
            raise ValueError(
                f"{folder} was saved {'with' if marker.get('fsdp') else 'without'} FSDP; resume it the same way "
                "(--parallelism), or export it with --export_checkpoint and start from the export"
            )
        step = self.checkpointer.load(folder)
        log.info("resumed from %s (step %d)", folder, step)
        return step

    # ---- the loop ----------------------------------------------------------------------------
    def train_step(self, step: int, batches, trace: TraceWriter) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` batches; a non-finite gradient skips the update.

        The skip decision reads the global gradient norm (the same on every rank
        after the all-reduce), so all ranks skip together.
        """
        config, acc = self.config, self.accelerator
        ga = config.optim.gradient_accumulation_steps
        waited, grad_norm, rows, extra = 0.0, 0.0, [], {}
        for micro in range(ga):
            loader_step = step * ga + micro
            batch, wait = next_batch(batches, loader_step)
            waited += wait
            trace.write(loader_step + 1, batch)
            if step == 0 and micro == 0 and acc.is_main_process:
                self.sanity_sheet(batch)
            if self.encoder is not None:
                encode_online(batch, self.builder, self.encoder)
            last = micro == ga - 1
            with self.accumulating(last):
                loss = batch_loss(
                    batch, self.transformer, self.vae, self.scheduler, config.flow, self.rank, self.world, loader_step,
                    acc.device,
                )  # fmt: skip
                if self.fsdp:
                    (loss / ga).backward()
                else:
                    acc.backward(loss)
                sync = last if self.fsdp else acc.sync_gradients
                if sync:
                    if config.tracking.report_model_info:
                        extra = group_grad_norms(self.transformer.named_parameters())
                    grad_norm, extra["clip_bound"] = self.clip(step)
                    if math.isfinite(grad_norm):
                        self.nonfinite.finite()
                        self.optimizer.step()
                    else:
                        self.nonfinite.skip(step + 1, grad_norm)
                if sync or not self.fsdp:  # accelerate's optimizer ignores zero_grad between syncs
                    self.optimizer.zero_grad(set_to_none=True)
            rows.append((batch["task"], batch["num_sources"], loss.detach().item()))
        self.lr_scheduler.step()
        # every rank's (task, N, loss): the logged loss is their mean, the running means are per task and per N
        gathered = self.losses.encode(rows)
        if self.world > 1:
            gathered = acc.gather(gathered.to(acc.device)).cpu()
        logs = self.losses.add(gathered)
        return {**logs, "rank_loss": sum(r[2] for r in rows) / ga, "grad_norm": grad_norm, "waited": waited, **extra}

    def accumulating(self, last: bool):
        """Gradient accumulation: FSDP reduces gradients on the last micro-batch only; accelerate's own otherwise."""
        if self.fsdp:
            self.transformer.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return self.accelerator.accumulate(self.transformer)

    def train(self) -> dict[str, Any]:
        config, acc = self.config, self.accelerator
        start = 0
        resume = ckpt.resume_point(config.output_dir, config.checkpoint.resume_from, self.rank, self.world, acc.device)
        if resume is not None:
            start = self.load(resume)
            if self.rank == 0:
                truncate_trace(config.data.trace_path, start)
            acc.wait_for_everyone()
        self.record_recipe(resume is not None, start)
        trace = TraceWriter(config.data.trace_path)
        batches = iter(self.loader)
        bar = tqdm(
            total=config.max_train_steps,
            initial=start,
            desc="train",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
        )
        losses, step_seconds = [], []
        wait_total = step_total = 0.0
        samples_done = 0
        per_step = config.stream.batch_size * config.optim.gradient_accumulation_steps * self.world
        for step in range(start, config.max_train_steps):
            t_step = time.perf_counter()
            result = self.train_step(step, batches, trace)
            elapsed = time.perf_counter() - t_step
            wait_total += result["waited"]
            step_total += elapsed
            step_seconds.append(elapsed)
            samples_done += per_step
            losses.append(result["loss"])
            done = step + 1
            lr = self.lr_scheduler.get_last_lr()[0]
            sps = per_step / max(elapsed, 1e-9)
            logs = {
                **{k: v for k, v in result.items() if k not in ("waited", "grad_norm")},
                "lr": lr,
                "grad_norm": result["grad_norm"] if math.isfinite(result["grad_norm"]) else 0.0,
                "samples_per_s": sps,
                "data_wait_fraction": result["waited"] / max(elapsed, 1e-9),
                "nonfinite_steps": self.nonfinite.steps,
            }
            acc.log(logs, step=done)
            bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{sps:.2f}")
            bar.update(1)
            if done % config.checkpoint.every == 0 or done == config.max_train_steps:
                self.save(done)
            if self.validator is not None and (done % config.validation.steps == 0 or done == config.max_train_steps):
                self.validate(done)
        bar.close()
        trace.close()
        acc.wait_for_everyone()
        outputs = self.export(config.output_dir)
        acc.end_training()
        return {
            "losses": losses,
            "data_wait_fraction": wait_total / max(step_total, 1e-9),
            "outputs": outputs,
            "samples": samples_done,
            "nonfinite_steps": self.nonfinite.steps,
            "step_seconds": step_seconds,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "world_size": self.world,
            "fsdp": self.fsdp,
        }

    def record_recipe(self, resumed: bool, step: int) -> None:
        """``output_dir/config.yaml``: compared with this run's flags on resume (every rank reads, rank 0 writes)."""
        config, acc = self.config, self.accelerator
        changes = {}
        if resumed:
            changes = recipes.check_resume_recipe(config.output_dir, config.recipe, step, config.allow_recipe_change)
        acc.wait_for_everyone()
        if acc.is_main_process:
            recipes.write_recipe(config.output_dir, config.recipe, step, changes)

    def validate(self, step: int) -> None:
        """Render the validation rows with the current weights; time logged apart from the training steps."""
        acc = self.accelerator
        started = time.perf_counter()
        acc.wait_for_everyone()
        model = self.transformer if self.fsdp else acc.unwrap_model(self.transformer)
        images = self.validator.render(model, self.vae, acc.device, acc.autocast())
        if acc.is_main_process or not self.fsdp:  # FSDP: every rank rendered all rows, rank 0 writes them
            self.validator.save_rows(step, images)
        acc.wait_for_everyone()
        if acc.is_main_process:
            folder, all_images = self.validator.save_sheet(step)
            self.log_images(step, folder, all_images)
        seconds = time.perf_counter() - started
        acc.log({"validation_seconds": seconds}, step=step)
        if acc.is_main_process:
            log.info("step %d: validation images in %.1fs", step, seconds)

    def log_images(self, step: int, folder: Path, images: list) -> None:
        import numpy as np
        from PIL import Image

        sheet = np.asarray(Image.open(folder / "sheet.png").convert("RGB"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation/sheet": sheet[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"validation": images, "validation_sheet": [sheet]}, step=step)

    def clip(self, step: int) -> tuple[float, float]:
        """Clip the trainable gradients (see ``step.clip_gradients``), unscaled first outside FSDP (fp16)."""
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        if not self.fsdp:
            self.accelerator.unscale_gradients()  # fp16: the norm of the true gradients
        return clip_gradients(params, step, self.config.optim)

    def sanity_sheet(self, batch: dict[str, Any]) -> None:
        """One contact sheet of the first batch: target, sources, instruction."""
        from pipeline.common.preview import contact_sheet, tensor_to_image

        rows = []
        for i in range(batch["target"].shape[0]):
            pictures = [tensor_to_image(s[i]) for s in batch["sources"]] + [tensor_to_image(batch["target"][i])]
            rows.append((pictures, f"{batch['task']} {batch['keys'][i]} [{batch['variants'][i]}] {batch['texts'][i]}"))
        contact_sheet(rows).save(Path(self.config.output_dir) / "first_batch.png")

    def export(self, out_dir: str | Path) -> dict[str, str]:
        """Collective: diffusers files on rank 0 (gathered from the shards under FSDP); ``{}`` on other ranks."""
        return export_weights(
            self.transformer if self.fsdp else self.accelerator.unwrap_model(self.transformer),
            self.config.model.lora,
            out_dir,
            self.trainable if self.fsdp else None,
            self.accelerator.is_main_process,
        )


def check_optimizer(use_8bit_adam: bool, fsdp: bool) -> None:
    """Refuse at start-up what would fail at the first step: bitsandbytes missing, or its kernels under FSDP2."""
    if not use_8bit_adam:
        return
    if fsdp:
        raise ValueError(
            "--use_8bit_adam works with DDP or one process: bitsandbytes' update kernels take no FSDP2 sharded "
            "(DTensor) parameters; drop --parallelism fsdp, or use AdamW (whose states FSDP shards instead)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("--use_8bit_adam needs bitsandbytes: pip install 'qwen-edit-shards[adam8bit]'") from None
