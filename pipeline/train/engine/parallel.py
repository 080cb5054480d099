"""How the transformer is spread over the ranks: one :class:`Parallelism` strategy, DDP or FSDP2.

The trainer asks the strategy, never the mode: prepare the model and optimizer,
backward with accumulation, whether this micro-batch synchronises, the model as
diffusers sees it, the checkpoint part of the weights, and the export's state.

For FSDP2 we wrap each transformer block, then the root, with PyTorch's ``fully_shard`` (as

torchtitan does) instead of going through accelerate's FSDP plugin: this path is
the same on GPUs (NCCL) and on CPUs (gloo), so the tests run the very code users
run.  Sharded parameters are fp32 master weights for full fine-tuning (the frozen
base stays in the compute dtype for LoRA); ``MixedPrecisionPolicy`` gathers them in
the compute dtype for forward and backward and reduces gradients in fp32.

FSDP checkpoints hold each rank's rows of the trainable parameters and their
optimizer state (``checkpoint/fsdp_files.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from pipeline.common.process_group import join_process_group
from pipeline.train.engine.checkpoint import parts as ckpt
from pipeline.train.engine.model import weight_dtype

log = logging.getLogger(__name__)


def shard_transformer(
    transformer: torch.nn.Module, mixed_precision: str | None, device: torch.device, cpu_offload: bool = False
):
    """Shard every transformer block, then the rest, over all ranks (in place; returns the model).

    ``cpu_offload``: FSDP2's ``CPUOffloadPolicy`` — shards, gradients (and so the optimizer) stay in
    host memory, each block is copied to the device when it is gathered (pinned host memory on CUDA).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    join_process_group(device.type, alone=True)  # one process: accelerate starts none; FSDP over 1 rank still runs
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    compute = weight_dtype(mixed_precision) if mixed_precision in ("bf16", "fp16") else None  # None: as stored
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    # no transformer.to(device) first: fully_shard moves each block to the mesh's device as it shards it,
    # so a GPU holds one unsharded block at a time, never the whole 20B model
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    for block in transformer.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(transformer, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return transformer


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def gather_full_state(model: torch.nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) state dict on rank 0's CPU, empty on the other ranks.

    ``names`` limits it to those parameters (a LoRA adapter) so the frozen base is never gathered.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if names is None:
        return get_model_state_dict(model, options=options)
    # gather parameter by parameter: only the ones asked for travel
    full = {}
    for name, param in model.named_parameters():
        if name in names:
            value = param.full_tensor() if hasattr(param, "full_tensor") else param
            if torch.distributed.get_rank() == 0:
                full[name] = value.detach().cpu().clone()
    return full


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


class Parallelism:
    """What differs between DDP and FSDP2, behind one interface (see :func:`strategy`)."""

    name = "ddp"

    def __init__(self, accelerator, mixed_precision: str | None, cpu_offload: bool = False):
        self.accelerator, self.mixed_precision, self.cpu_offload = accelerator, mixed_precision, cpu_offload
        self.model: torch.nn.Module | None = None
        self.optimizer = None

    def prepare(self, transformer: torch.nn.Module, groups: list[dict], make_optimizer, weights=None) -> tuple:
        """The training model and its optimizer, built over ``groups`` by ``make_optimizer``. ``weights``: what a
        model built on ``meta`` is still to be filled from (FSDP only: DDP models arrive filled)."""
        self.model, self.optimizer = self.accelerator.prepare(transformer, make_optimizer(groups))
        return self.model, self.optimizer

    def accumulating(self, last: bool):
        """The context of one micro-batch's forward and backward (accelerate's accumulation)."""
        return self.accelerator.accumulate(self.model)

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        self.accelerator.backward(loss)

    def syncs(self, last: bool) -> bool:
        """Whether the gradients are complete after this micro-batch (clip and step then)."""
        return self.accelerator.sync_gradients

    def zero_grad(self, synced: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # accelerate's optimizer ignores it between syncs

    def unscale(self) -> None:
        self.accelerator.unscale_gradients()  # fp16: clip the true gradients

    def unwrapped(self) -> torch.nn.Module:
        """The model as diffusers and the validation pipelines see it."""
        return self.accelerator.unwrap_model(self.model)

    def weights_part(self, rank: int):
        """The checkpoint part holding the trainable weights and the optimizer's state."""
        return ckpt.ReplicatedWeights(self.unwrapped(), self.optimizer, rank)

    def export_names(self) -> set[str] | None:
        """The trained parameters to gather for an export (FSDP); None: the model is whole on every rank."""
        return None

    def renders_every_row(self) -> bool:
        """Validation: every rank renders every row in lockstep (FSDP's collectives), or each its own rows."""
        return False


class FSDP(Parallelism):
    """Our own FSDP2 (``fully_shard`` per block); accelerate does not touch the model."""

    name = "fsdp"

    def prepare(self, transformer: torch.nn.Module, groups: list[dict], make_optimizer, weights=None) -> tuple:
        names = {id(p): n for n, p in transformer.named_parameters()}  # sharding replaces the parameters
        group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        device = self.accelerator.device
        shard_transformer(transformer, self.mixed_precision, device, self.cpu_offload)
        if weights is not None:  # built on meta: each rank allocates and reads only its own rows
            from pipeline.train.engine.loading import allocate, fill

            allocate(transformer, "cpu" if self.cpu_offload else device)
            fill(transformer, weights)
            weights.handles.clear()  # the files are closed once every rank has its rows
        params = dict(transformer.named_parameters())
        groups = [{**g, "params": [params[n] for n in ns]} for g, ns in zip(groups, group_names, strict=True)]
        self.model, self.optimizer = transformer, make_optimizer(groups)
        self.trainable = trainable_names(transformer)
        return self.model, self.optimizer

    def accumulating(self, last: bool):
        self.model.set_requires_gradient_sync(last)  # gradients are reduced on the last micro-batch only
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        (loss / accumulation).backward()

    def syncs(self, last: bool) -> bool:
        return last

    def zero_grad(self, synced: bool) -> None:
        if synced:
            self.optimizer.zero_grad(set_to_none=True)

    def unscale(self) -> None:
        return None  # FSDP reduces in fp32; no loss scaler

    def unwrapped(self) -> torch.nn.Module:
        return self.model

    def weights_part(self, rank: int):
        return ckpt.FSDPShards(self.model, self.optimizer, self.trainable)

    def export_names(self) -> set[str] | None:
        return self.trainable

    def renders_every_row(self) -> bool:
        return True


def strategy(fsdp: bool, accelerator, mixed_precision: str | None, cpu_offload: bool = False) -> Parallelism:
    return (FSDP if fsdp else Parallelism)(accelerator, mixed_precision, cpu_offload)


def make_accelerator(config):
    """The run's ``Accelerator``: mixed precision, accumulation, trackers, and the process group's time limit
    (``--ddp_timeout``). Under our FSDP it must not build its own plugin."""
    import datetime

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    tracking, out = config.tracking, config.output_dir
    with without_accelerate_fsdp(config.fsdp):
        return Accelerator(
            mixed_precision=config.optim.mixed_precision,
            gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
            log_with=None if tracking.report_to == "none" else tracking.report_to.split(","),
            project_config=ProjectConfiguration(project_dir=out, logging_dir=str(Path(out) / tracking.logging_dir)),
            cpu=not torch.cuda.is_available(),
            # the last block's text-stream outputs do not reach the loss: some parameters get no gradient; the
            # buffers are constants (rope frequencies, an fp8 base): DDP must not broadcast them every forward
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False),
                InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=config.ddp_timeout)),
            ],
        )
