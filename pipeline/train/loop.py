"""The training loop: the loss of a batch, one ``train_step``, checkpoints of named parts, export.

Checkpoints (``checkpoint-{step}/``) hold no pickle: a :class:`Checkpointer` saves
named parts — model and optimizer (safetensors + JSON under DDP; sharded with
torch.distributed.checkpoint under FSDP), scheduler and loop state (JSON), each
rank's RNG (safetensors) and data-loader state (JSON).  The data-only run uses
the same checkpointer with the data part alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pipeline.common import images as imaging
from pipeline.common.flags import distributed_env
from pipeline.train import checkpoint as ckpt
from pipeline.train import flow, parallel
from pipeline.train import model as models
from pipeline.train import recipe as recipes
from pipeline.train.batching import pad_embeddings
from pipeline.train.clipping import clip_bound
from pipeline.train.config import FlowConfig, TrainConfig
from pipeline.train.data import DataPart, TraceWriter, build_dataset, build_loader, next_batch, truncate_trace
from pipeline.train.metrics import LossBoard, group_grad_norms
from pipeline.train.seeding import step_generator

log = logging.getLogger("pipeline.train")

TRAINER_STATE = "trainer_state.json"


class NonFiniteTraining(RuntimeError):
    """Too many optimizer steps in a row had a NaN/Inf gradient norm."""


# ---------------------------------------------------------------------------------------------
# loss for one batch


def batch_loss(
    batch: dict[str, Any],
    transformer,
    vae,
    scheduler,
    cfg: FlowConfig,
    rank: int,
    world: int,
    loader_step: int,
    device: torch.device | None = None,
):
    """Flow-matching loss of one batch; the noise depends on (seed, rank, step) only. ``device``: where the
    transformer computes (default: where its parameters are; not so under FSDP's CPU offload)."""
    device = device or next(p.device for p in transformer.parameters())
    x0 = flow.encode_latents(vae, batch["target"], cfg.vae_mini_batch)
    sources = [flow.encode_latents(vae, s, cfg.vae_mini_batch) for s in batch["sources"]]
    generator = step_generator(cfg.seed, rank, loader_step)
    packed_x0 = flow.pack_latents(x0)
    timesteps, sigmas = flow.training_schedule(scheduler, cfg.sampling_steps, packed_x0.shape[1])
    idx = flow.sample_indices(
        x0.shape[0],
        cfg.sampling_steps,
        generator,
        cfg.uniform_sampling,
        rank,
        world,
        cfg.weighting_scheme,
        cfg.logit_mean,
        cfg.logit_std,
        cfg.mode_scale,
    )
    # drawn on the CPU generator so the values do not depend on the device, then moved to the latents
    noise = torch.randn(packed_x0.shape, generator=generator, dtype=torch.float32).to(packed_x0.device, packed_x0.dtype)
    sigma = sigmas[idx].to(packed_x0.device)
    noisy, target = flow.noisy_input(packed_x0, noise, sigma)
    hidden = torch.cat([noisy, *[flow.pack_latents(s) for s in sources]], dim=1)
    dtype = next(p.dtype for p in transformer.parameters())
    mask = batch["prompt_mask"].to(device)
    pred = transformer(
        hidden_states=hidden.to(device, dtype),
        timestep=(timesteps[idx] / 1000).to(device, dtype),
        encoder_hidden_states=batch["prompt_embeds"].to(device, dtype),
        encoder_hidden_states_mask=mask,
        img_shapes=flow.img_shapes(x0, sources),
        return_dict=False,
    )[0]
    pred = pred[:, : packed_x0.shape[1]]
    return flow.flow_loss(pred, target.to(device), sigma.to(device), cfg.weighting_scheme)


# ---------------------------------------------------------------------------------------------
# checkpoints without pickle


def optimizer_to_files(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state as safetensors tensors and JSON scalars, keyed ``param/key[/sub…]`` (bitsandbytes'
    8-bit AdamW nests its quantisation state in a dict per parameter)."""
    state = optimizer.state_dict()
    tensors, scalars, storages = {}, {}, set()

    def put(key: str, value: Any) -> None:
        if torch.is_tensor(value):
            value = value.detach().cpu().contiguous()
            if value.untyped_storage().data_ptr() in storages:  # shared (bitsandbytes' qmaps): its own copy
                value = value.clone()
            storages.add(value.untyped_storage().data_ptr())
            tensors[key] = value
        elif isinstance(value, dict) and value:
            for sub, inner in value.items():
                put(f"{key}/{sub}", inner)
        else:
            scalars[key] = value

    for idx, entry in state["state"].items():
        for key, value in entry.items():
            put(f"{idx}/{key}", value)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        parts = flat.split("/") if "/" in flat else flat.split(".", 1)  # "idx.key": checkpoints before nesting
        node = state.setdefault(int(parts[0]), {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class ReplicatedWeights:
    """DDP / one process: rank 0 writes the trainable weights and the optimizer's tensors as safetensors."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def save(self, folder: Path) -> None:
        t = self.trainer
        if t.rank != 0:
            return
        save_file(
            models.trainable_state(t.accelerator.unwrap_model(t.transformer)), str(folder / "trainable.safetensors")
        )
        tensors, meta = optimizer_to_files(t.optimizer)
        save_file(tensors, str(folder / "optimizer.safetensors"))
        ckpt.write_json_file(folder / "optimizer.json", meta)

    def load(self, folder: Path) -> None:
        t = self.trainer
        path = folder / "trainable.safetensors"
        weights = load_file(str(path))
        model = t.accelerator.unwrap_model(t.transformer)
        absent = sorted({n for n, p in model.named_parameters() if p.requires_grad} - weights.keys())
        if absent:  # strict=False below lets the frozen base be absent, never a trained weight
            raise ckpt.CheckpointDamaged(
                f"{path} lacks {len(absent)} of the run's trainable parameters, e.g. {absent[:3]}: it was saved by "
                "another run mode (LoRA targets, rank, trainable modules) or is damaged"
            )
        result = model.load_state_dict(weights, strict=False)
        if result.unexpected_keys:
            raise ckpt.CheckpointDamaged(f"{path}: weights this model does not have, e.g. {result.unexpected_keys[:3]}")
        meta = json.loads((folder / "optimizer.json").read_text())
        t.optimizer.load_state_dict(optimizer_from_files(load_file(str(folder / "optimizer.safetensors")), meta))


class FSDPShards:
    """FSDP: every rank writes its shards of the trainable weights and optimizer state (DCP)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def save(self, folder: Path) -> None:
        t = self.trainer
        parallel.save_shards(folder, t.transformer, t.optimizer, t.trainable)

    def load(self, folder: Path) -> None:
        t = self.trainer
        parallel.load_shards(folder, t.transformer, t.optimizer, t.trainable)


class LoraFiles:
    """The LoRA in the ``--lora_export_format`` files, written into the checkpoint (collective under FSDP)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def save(self, folder: Path) -> None:
        self.trainer.export(folder)

    def load(self, folder: Path) -> None:  # the adapter itself comes back with the model part
        return None


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
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0

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
            from pipeline.train.validation import Validator

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
        weights = FSDPShards(self) if self.fsdp else ReplicatedWeights(self)
        parts = {
            "model_and_optimizer": weights,
            "scheduler": ckpt.JsonPart(
                "scheduler.json", self.lr_scheduler.state_dict, self.lr_scheduler.load_state_dict, self.rank
            ),
            "loop": ckpt.JsonPart(TRAINER_STATE, self.trainer_state, self.load_trainer_state, self.rank, optional=True),
            "rng": ckpt.RngPart(self.rank),
            "data": DataPart(self.loader, self.rank, self.world),
        }
        if config.model.lora is not None:  # a LoRA file that loads as it is, in every checkpoint
            parts["lora_files"] = LoraFiles(self)
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

    def trainer_state(self) -> dict[str, Any]:
        """The loop's own state: identical on every rank (global gradient norms), so rank 0 writes it."""
        return {
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])

    # ---- online prompt encoding ----------------------------------------------------------------
    def encode_online(self, batch: dict[str, Any]) -> None:
        """``--condition_encoder_mode sync``: the same prompt code as extraction, on this device."""
        embeddings = []
        for cond in batch.pop("conditions"):
            if cond["kind"] == "t2i":
                inputs = self.builder.t2i(cond["text"])
            else:
                pictures = [imaging.open_rgb(b) for b in cond["images"]]
                inputs = self.builder.edit(self.builder.condition_images(pictures, cond["target_size"]), cond["text"])
            embeddings.append(self.encoder.encode([inputs], self.builder.drop_index)[0].to(torch.bfloat16))
        batch["prompt_embeds"], batch["prompt_mask"] = pad_embeddings(embeddings)

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
                self.encode_online(batch)
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
                        self.nonfinite_in_a_row = 0
                        self.optimizer.step()
                    else:
                        self.skip_nonfinite(step + 1, grad_norm)
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

    def skip_nonfinite(self, step: int, grad_norm: float) -> None:
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        log.warning(
            "step %d: gradient norm %s, update skipped (%d in a row, %d in all)",
            step,
            grad_norm,
            self.nonfinite_in_a_row,
            self.nonfinite_steps,
        )
        limit = self.config.optim.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteTraining(
                f"{self.nonfinite_in_a_row} steps in a row had a non-finite gradient norm (--max_nonfinite_steps "
                f"{limit}); the weights were not updated by any of them. Lower the learning rate, check the data "
                f"(shards_tools verify), or resume from an earlier checkpoint"
            )

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
                "nonfinite_steps": self.nonfinite_steps,
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
            "nonfinite_steps": self.nonfinite_steps,
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
        """The original tool's clipping (see ``clipping``): returns (global norm before clipping, bound applied).

        One pass for the norm, one for the scaling when it clips; under FSDP the norm of
        sharded gradients is a DTensor whose partial sums are reduced for the bound.
        """
        optim = self.config.optim
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        if not self.fsdp:
            self.accelerator.unscale_gradients()  # fp16: the norm of the true gradients
        total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        ratio, start = optim.initial_grad_norm_ratio, optim.abnormal_norm_clip_start
        bound = clip_bound(norm, step, optim.max_grad_norm, ratio, start)
        if math.isfinite(norm) and norm > bound:
            torch.nn.utils.clip_grads_with_norm_(params, bound, total)
            if bound < optim.max_grad_norm and step > start:
                log.warning("step %d: abnormal gradient norm %.3g, clipped to %.3g", step + 1, norm, bound)
        return norm, bound if math.isfinite(bound) else 0.0

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
        lora = self.config.model.lora is not None
        state = None
        if self.fsdp:
            state = parallel.gather_full_state(self.transformer, self.trainable if lora else None)
        if not self.accelerator.is_main_process:
            return {}
        model = self.accelerator.unwrap_model(self.transformer) if not self.fsdp else self.transformer
        if lora:
            written = models.export_lora(model, out_dir, state, self.config.model.lora.export_format)
            return {f"lora_{kind}": path for kind, path in written.items()}
        return {"transformer": str(models.export_transformer(model, out_dir, state))}


def run_data_only(config: TrainConfig) -> int:
    """The real loader without a model: trace, checkpoints of the data state, exact resume."""
    env = distributed_env()
    rank, world = env.rank, env.world
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")

    def barrier() -> None:
        if world > 1:
            torch.distributed.barrier()

    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(config.data, config.stream, rank, world)
    loader = build_loader(dataset, config.data)
    checkpointer = ckpt.Checkpointer(
        config.output_dir,
        rank,
        barrier,
        {"data": DataPart(loader, rank, world)},
        {"data_only": True, "world_size": world},
        config.checkpoint.total_limit,
        world,
    )
    start = 0
    resume = ckpt.resume_point(config.output_dir, config.checkpoint.resume_from, rank, world, "cpu")
    if resume is not None:
        start = checkpointer.load(resume)
        log.info("resuming data at step %d from %s", start, resume)
        if rank == 0:
            truncate_trace(config.data.trace_path, start)
        barrier()
    trace = TraceWriter(config.data.trace_path)
    started, waited, batches = time.perf_counter(), 0.0, iter(loader)
    try:
        for step in range(start, config.max_train_steps):
            batch, wait = next_batch(batches, step)
            waited += wait
            trace.write(step + 1, batch)
            done = step + 1
            if done % config.checkpoint.every == 0 or done == config.max_train_steps:
                checkpointer.save(done)
    finally:
        trace.close()
    elapsed = time.perf_counter() - started
    steps = config.max_train_steps - start
    log.info(
        "%d steps in %.1fs (%.2f steps/s), waiting for data %.1fs", steps, elapsed, steps / max(elapsed, 1e-9), waited
    )
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


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


def use_fsdp(parallelism: str) -> bool:
    """``--parallelism fsdp``, or ``auto`` under an accelerate FSDP launch (``--use_fsdp``, or a config file with
    ``distributed_type: FSDP``: both reach the processes as ``ACCELERATE_USE_FSDP``), on GPUs or CPUs."""
    if parallelism == "auto":
        return distributed_env().fsdp_requested
    return parallelism == "fsdp"


@contextlib.contextmanager
def without_accelerate_fsdp(active: bool):
    """Build the Accelerator as for DDP when the trainer shards with its own FSDP2: accelerate would otherwise
    make its FSDP v1 plugin from the launcher's environment (on CPU it refuses ``sync_module_states``; on GPUs its
    state would steer backward and accumulation of a model it never prepared). accelerate then only launches."""
    if not active:
        yield
        return
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        else:
            os.environ["ACCELERATE_USE_FSDP"] = saved
