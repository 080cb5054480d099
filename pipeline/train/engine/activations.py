"""What one transformer block really holds for backward, counted on the model, not taken from a constant.

The plan used to multiply tokens by a GPT-layer constant (34 × hidden bytes per token
and block).  A real-width Qwen-Image block saves more, and how much depends on the mode:
LoRA dropout keeps a copy of every adapted input, autocast keeps bf16 copies of fp32
weights (full fine-tuning under DDP), FSDP's param dtype does not.  So the plan builds
the configured model with **one** block at the real width on the CPU, in the run's exact
mode (LoRA targets, rank, dropout, base dtype, autocast or FSDP's cast), runs a forward
at a few small token counts and counts every tensor autograd saves inside the block
(saved-tensor hooks; each storage once; parameters excluded, they are the weights).
Saved bytes are linear in tokens with a fused attention kernel (no tokens² matrix), so
three counts give a per-image-token slope, a per-text-token slope and a constant.  With
gradient checkpointing a block keeps only its inputs (also measured: the tensors that
enter the block) and one block is recomputed at a time.

Counted with the CPU's flash-attention kernel; CUDA's flash and memory-efficient kernels
save the same kind of tensors (q, k, v, output, log-sum-exp).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pipeline import families
from pipeline.shards.format import DEFAULT_FAMILY
from pipeline.train.engine.model import weight_dtype

# the token counts the slopes are measured at: small (a real-width block forward takes ~1 s here), and
# different enough that rounding in the counts does not move the slopes
_IMAGE_TOKENS = (64, 192)
_TEXT_TOKENS = (32, 96)


@dataclass(frozen=True)
class ActivationMode:
    """What decides what a block saves: the trained parameters, dropout, dtypes and how compute is cast."""

    lora_rank: int | None = None  # None: full fine-tuning
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0
    trainable_modules: tuple[str, ...] = (".",)
    mixed_precision: str | None = "bf16"
    fsdp: bool = False  # FSDP2's MixedPrecisionPolicy casts parameters; DDP runs under autocast
    base_weight_dtype: str = "auto"  # LoRA: float8_e4m3fn stores the frozen block Linears in fp8
    family: str = DEFAULT_FAMILY  # whose transformer class and forward inputs the probe uses


@dataclass(frozen=True)
class BlockActivations:
    """Bytes one block saves for backward: ``per_image_token · I + per_text_token · T + constant``; and the bytes
    of its inputs per token (what gradient checkpointing keeps of it)."""

    per_image_token: float
    per_text_token: float
    constant: float
    input_per_image_token: float
    input_per_text_token: float

    def saved(self, image_tokens: int, text_tokens: int, batch: int = 1) -> float:
        tokens = self.per_image_token * image_tokens + self.per_text_token * text_tokens
        return batch * tokens + self.constant

    def inputs(self, image_tokens: int, text_tokens: int, batch: int = 1) -> float:
        return batch * (self.input_per_image_token * image_tokens + self.input_per_text_token * text_tokens)


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` in ``dtype`` by PyTorch's own cast: diffusers' ``ModelMixin.to`` warns on every dtype cast (that
    some modules should stay in float32, listing none), and the plan casts dozens of models."""
    return torch.nn.Module.to(module, dtype)


def build_one_block(transformer_config: dict, mode: ActivationMode) -> torch.nn.Module:
    """The configured transformer with one block, on the CPU, with the mode's dtypes and trainable parameters."""
    from pipeline.train.engine.model import add_lora, select_trainable

    config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    config["num_layers"] = 1
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = families.get(mode.family).transformer_class().from_config(config)
    compute = weight_dtype(mode.mixed_precision)
    if mode.lora_rank is not None:
        cast(model, compute)  # the frozen base in the compute dtype
        add_lora(model, mode.lora_rank, float(mode.lora_rank), mode.lora_dropout, list(mode.lora_targets), None)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # the adapter in fp32, as the trainer keeps it
        if mode.base_weight_dtype != "auto":
            from pipeline.train.engine.fp8 import FP8_DTYPES, quantize_frozen_linears

            quantize_frozen_linears(model, FP8_DTYPES[mode.base_weight_dtype])
    else:
        cast(model, torch.float32)  # fp32 master weights
        select_trainable(model, list(mode.trainable_modules), [])
    if mode.fsdp:  # MixedPrecisionPolicy: forward and backward see the parameters in the compute dtype
        cast(model, compute)
    return model.train()


def count_saved(model: torch.nn.Module, mode: ActivationMode, image_tokens: int, text_tokens: int) -> tuple[int, int]:
    """(bytes the block saves for backward, bytes of the tensors that enter it) for one sample."""
    block = model.transformer_blocks[0]
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}  # the weights
    saved: dict[int, int] = {}
    inputs: dict[int, int] = {}
    inside = [False]

    def enter(module, args, kwargs):
        inside[0] = True
        for value in [*args, *kwargs.values()]:
            if torch.is_tensor(value) and value.dim() == 3:  # hidden states and text states (not temb, rope)
                inputs[value.untyped_storage().data_ptr()] = value.numel() * value.element_size()

    def leave(module, args, output):
        inside[0] = False

    def pack(tensor):
        if inside[0]:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params and storage.nbytes():
                saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = [block.register_forward_pre_hook(enter, with_kwargs=True), block.register_forward_hook(leave)]
    compute = weight_dtype(mode.mixed_precision)
    autocast = not mode.fsdp and compute != torch.float32
    dtype = compute if mode.fsdp else torch.float32
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=compute, enabled=autocast):
                model(**families.get(mode.family).block_inputs(model.config, image_tokens, text_tokens, dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(saved.values()), sum(inputs.values())


@functools.lru_cache(maxsize=16)
def _measure(config_items: tuple, mode: ActivationMode) -> BlockActivations:
    model = build_one_block(dict(config_items), mode)
    (i0, i1), (t0, t1) = _IMAGE_TOKENS, _TEXT_TOKENS
    with torch.random.fork_rng(devices=[]):
        base, base_in = count_saved(model, mode, i0, t0)
        more_image, more_image_in = count_saved(model, mode, i1, t0)
        more_text, more_text_in = count_saved(model, mode, i0, t1)
    per_image = (more_image - base) / (i1 - i0)
    per_text = (more_text - base) / (t1 - t0)
    in_image = (more_image_in - base_in) / (i1 - i0)
    in_text = (more_text_in - base_in) / (t1 - t0)
    return BlockActivations(per_image, per_text, base - per_image * i0 - per_text * t0, in_image, in_text)


def block_activations(transformer_config: dict, mode: ActivationMode) -> BlockActivations:
    """Measured once per (config, mode) in a process (a few seconds at the published width on 2 CPU cores)."""
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in transformer_config.items()))
    return _measure(items, mode)
