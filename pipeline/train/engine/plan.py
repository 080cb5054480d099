"""``--plan``: what a training mode needs per GPU, from the model's config: counted, not assumed.

Nothing is downloaded and no weights are read.  The transformer and the VAE are built
on ``meta`` from their ``config.json`` (or from a published config the model
family declares, e.g. ``qwen-image-edit-2509``), which gives exact parameter counts; bytes per parameter follow the
dtypes of :func:`pipeline.train.engine.model.training_dtypes`.

What is alive at the peak, by kind:

* **activations**: what one block saves for backward, counted on a real-width block
  in the run's exact mode (:mod:`pipeline.train.engine.activations`), times the blocks; with
  gradient checkpointing each block keeps its inputs (and, under autocast, the bf16
  copies of fp32 weights, which autocast's cache holds until the forward ends) and one
  block is recomputed at a time;
* **backward temporaries**: one block's gradients in the compute dtype before they are
  added to the fp32 gradients (DDP), or one block's unsharded fp32 gradients before the
  reduce-scatter (FSDP);
* **VAE encode**: the largest set of tensors alive at once while the VAE encodes one
  mini-batch of the batch's images at the training size, counted on ``meta`` by
  following every op's output until it is freed (:class:`LiveBytes`); it comes before
  the forward, so the peak is the larger of it and the forward/backward;
* the optimizer step: AdamW runs as the fused kernel on CUDA (the trainer asks for
  it there), which allocates no per-parameter temporaries; the ``foreach`` kernel it
  replaces would add one fp32 copy of the trainable parameters.

* validation rendering (when asked): the VAE decode at the render size, counted the
  same way, next to the training state.

Not counted: the CUDA context and allocator fragmentation (hence ``fits`` keeps a
10 % margin), the rendering's own transformer forward (no grad, one sample), and the
data loader's host memory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import families
from pipeline.shards.format import DEFAULT_FAMILY
from pipeline.train.engine.activations import ActivationMode, BlockActivations, block_activations, cast

GiB = 1024**3

MARGIN = 0.9  # share of the card the plan may use


def taken(config: str, name: str, default: Any) -> Any:
    """A request field whose value is the ``config``'s field ``name`` (see :meth:`PlanRequest.from_configs`)."""
    return field(default=default, metadata={"from": (config, name)})


@dataclass(frozen=True)
class PlanRequest:
    """What the memory plan is asked: a run's mode and sizes. Most fields are a training option's value, declared
    here by the config and field they come from; the rest are resolved by the caller."""

    lora: bool
    lora_rank: int = taken("lora", "rank", 32)
    lora_targets: tuple[str, ...] = taken("lora", "target_modules", ())
    lora_dropout: float = taken("lora", "dropout", 0.0)
    trainable_modules: tuple[str, ...] = taken("model", "trainable_modules", (".",))
    fsdp: bool = False
    processes: int = 1
    mixed_precision: str | None = "bf16"
    gradient_checkpointing: bool = taken("model", "gradient_checkpointing", False)
    batch_size: int = 1
    image_sample_size: int = taken("stream", "image_sample_size", 512)
    num_sources: int = taken("plan", "plan_num_sources", 1)
    text_tokens: int = taken("plan", "plan_text_tokens", 512)
    optimizer_bytes_per_param: int = 8  # AdamW: two fp32 moments (8-bit Adam: 2)
    gpu_memory_gib: float = taken("plan", "plan_gpu_memory", 80.0)
    vae_mini_batch: int = taken("flow", "vae_mini_batch", 32)
    base_weight_dtype: str = taken("lora", "base_weight_dtype", "auto")  # LoRA: fp8 frozen block Linears
    cpu_offload: bool = False  # FSDP: shards, gradients and optimizer states in host memory
    validation: bool = False  # validation images are rendered next to the training state
    family: str = DEFAULT_FAMILY

    @classmethod
    def from_configs(cls, configs: dict[str, Any], **resolved: Any) -> PlanRequest:
        """The request of a run whose configs are ``configs`` (by the names the fields declare); ``resolved``:
        the fields the caller decides (the mode, the processes, the precision, the batch the family allows)."""
        values = {
            f.name: getattr(configs[f.metadata["from"][0]], f.metadata["from"][1])
            for f in dataclasses.fields(cls)
            if "from" in f.metadata and f.name not in resolved
        }
        return cls(**values, **resolved)

    def activation_mode(self) -> ActivationMode:
        return ActivationMode(
            lora_rank=self.lora_rank if self.lora else None,
            lora_targets=self.lora_targets,
            lora_dropout=self.lora_dropout if self.lora else 0.0,
            trainable_modules=self.trainable_modules,
            mixed_precision=self.mixed_precision,
            fsdp=self.fsdp,
            base_weight_dtype=self.base_weight_dtype if self.lora else "auto",
            family=self.family,
        )


class LiveBytes(TorchDispatchMode):
    """The most bytes that op outputs held at once while it was active (views and in-place results are not new
    memory). On ``meta`` it counts a whole forward of a real-size model in no time and no memory."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    size = tensor.numel() * tensor.element_size()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def vae_encode_peak(vae: torch.nn.Module, images: int, size: int, dtype: torch.dtype) -> int:
    """Bytes alive at once while the VAE encodes ``images`` pictures of ``size``² (on ``meta``: counted, not run)."""
    channels = vae.config.get("in_channels", 3)  # RGB, or RGBA (Qwen-Image 2.1)
    return _peak_on_meta(
        lambda: cast(vae, dtype).encode(torch.empty(images, channels, 1, size, size, device="meta", dtype=dtype))
    )


def vae_decode_peak(vae: torch.nn.Module, size: int, dtype: torch.dtype) -> int:
    """Bytes alive at once while the VAE decodes one ``size``² picture (validation rendering), counted on ``meta``."""
    side = size // vae.config.get("scale_factor_spatial", 8)  # 8× (Qwen-Image-Edit) or 16× (2.1)
    latents = torch.empty(1, vae.config.z_dim, 1, side, side, device="meta", dtype=dtype)
    return _peak_on_meta(lambda: cast(vae, dtype).decode(latents))


def _peak_on_meta(run) -> int:
    counter = LiveBytes()
    with torch.no_grad(), counter:
        run()
    return counter.peak


def build_on_meta(transformer_config: dict, vae_config: dict | None = None, family: str | None = None):
    """The transformer (and VAE: its config, else the family's default one) from their configs, on ``meta``:
    shapes and counts, no memory. ``family``: whose classes (None: the one of v1 shards)."""
    chosen = families.get(family)
    config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = chosen.transformer_class().from_config(config)
        vae = chosen.vae_class().from_config(vae_config) if vae_config else chosen.vae_class()()
    return transformer, vae


def lora_parameters(transformer: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter size: rank × (in + out) for every Linear PEFT would match (name equal to or ending in a target)."""
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def memory_plan(
    transformer: torch.nn.Module, vae: torch.nn.Module, req: PlanRequest, activations: BlockActivations | None = None
) -> dict:
    """Bytes per GPU by kind, and whether the peak fits ``gpu_memory_gib`` with a 10 % margin.

    ``activations``: a block's counts (measured for the request's mode when not given).

    Why one function: it is one sum, each line one term with the reason beside it (weights, gradients, optimizer,
    host offload, loading, activations, VAE, validation); the terms share the mode's quantities (shards, block
    size, compute bytes), and read top-down they are the table docs/training.md explains.
    """
    from pipeline.train.engine.model import training_dtypes

    params = sum(p.numel() for p in transformer.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in transformer.transformer_blocks)
    blocks = len(transformer.transformer_blocks)
    base_dtype, vae_dtype = training_dtypes(req.mixed_precision, req.lora)
    size = torch.empty(0, dtype=base_dtype).element_size()
    compute = 2 if req.mixed_precision in ("bf16", "fp16") else 4
    shards = req.processes if req.fsdp else 1
    if req.lora:
        trainable = lora_parameters(transformer, req.lora_rank, req.lora_targets)
        block_trainable = lora_parameters(transformer.transformer_blocks[0], req.lora_rank, req.lora_targets)
        weights = params * size / shards + trainable * 4
        if req.base_weight_dtype != "auto":  # block Linears: 1 byte a weight and a fp32 scale per output row
            linears = [m for b in transformer.transformer_blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
            weights -= sum(m.weight.numel() * (size - 1) - m.out_features * 4 for m in linears) / shards
    else:
        counts = {n: p.numel() for n, p in transformer.named_parameters()}
        trainable = sum(c for n, c in counts.items() if any(t in n for t in req.trainable_modules))
        block_trainable = sum(
            p.numel() for n, p in transformer.transformer_blocks[0].named_parameters()
            if any(t in f"transformer_blocks.0.{n}" for t in req.trainable_modules)
        )  # fmt: skip
        weights = params * 4 / shards
    if req.fsdp:  # one block gathered in the compute dtype for forward, one prefetched
        weights += 2 * block * compute
    grads = trainable * 4 / shards
    if req.fsdp:
        grads += block * 4  # one block's unsharded gradients before the reduce-scatter
    elif req.processes > 1:
        grads *= 2  # DDP's reducer buckets hold a second copy
    backward_temporaries = 0 if req.fsdp else block_trainable * compute  # a block's grads before the fp32 add
    optimizer = trainable * req.optimizer_bytes_per_param / shards
    host = 0.0
    if req.fsdp and req.cpu_offload:  # the shards, their gradients and the optimizer live in host memory
        gathered = 2 * block * compute
        host = weights - gathered + grads - block * 4 + optimizer
        weights, grads, optimizer = gathered, block * 4, 0.0
    # while the model loads (loading.py; weights stored in bf16): under FSDP a process reads one tensor's rows at a
    # time and converts them on their way to the GPU; otherwise one block is filled in host memory, then moved
    largest = max(p.numel() for p in transformer.parameters())
    loading = largest * (2 + size) / shards if req.fsdp else block * (2 + size)
    if activations is None:
        activations = block_activations(transformer_config(transformer), req.activation_mode())
    image_tokens = (req.image_sample_size // 16) ** 2 * (1 + req.num_sources)
    text_tokens = req.text_tokens
    per_block = activations.saved(image_tokens, text_tokens, req.batch_size)
    if req.gradient_checkpointing:  # every block's inputs (and autocast's weight copies), one block recomputed
        kept = activations.inputs(image_tokens, text_tokens, req.batch_size) + activations.constant
        held = blocks * kept + (per_block - activations.constant)
    else:
        held = blocks * per_block
    vae_bytes = sum(p.numel() for p in vae.parameters()) * torch.empty(0, dtype=vae_dtype).element_size()
    # the target and each source are encoded apart, in chunks of --vae_mini_batch of the batch's pictures
    encode = vae_encode_peak(vae, min(req.vae_mini_batch, req.batch_size), req.image_sample_size, vae_dtype)
    training = grads + held + backward_temporaries
    # validation renders at the training size after a step: the VAE decode's transient next to the training state
    decode = vae_decode_peak(vae, req.image_sample_size, vae_dtype) if req.validation else 0
    total = weights + optimizer + vae_bytes + max(training, encode, decode)
    return {
        "request": asdict(req),
        "transformer_parameters": params,
        "trainable_parameters": trainable,
        "tokens_per_sample": image_tokens + text_tokens,
        "hidden_size": transformer.config.num_attention_heads * transformer.config.attention_head_dim,
        "block_activations": asdict(activations),
        "gib_per_gpu": {
            "weights": weights / GiB,
            "gradients": grads / GiB,
            "optimizer": optimizer / GiB,
            "activations": held / GiB,
            "backward_temporaries": backward_temporaries / GiB,
            "vae": vae_bytes / GiB,
            "vae_encode": encode / GiB,
            "validation_decode": decode / GiB,
            "total": total / GiB,
        },
        "host_gib_per_process": host / GiB,
        "host_load_gib_per_process": (host + loading) / GiB,
        "fits": total <= MARGIN * req.gpu_memory_gib * GiB,
    }


def transformer_config(transformer: torch.nn.Module) -> dict:
    return {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}


def format_plan(plan: dict) -> str:
    req, gib = plan["request"], plan["gib_per_gpu"]
    mode = f"{'LoRA r' + str(req['lora_rank']) if req['lora'] else 'full'}, {'FSDP' if req['fsdp'] else 'DDP'}"
    head = (
        f"memory plan per GPU: {mode} over {req['processes']} process(es), mixed precision "
        f"{req['mixed_precision'] or 'no'}, gradient checkpointing {'on' if req['gradient_checkpointing'] else 'off'}, "
        f"batch {req['batch_size']} × {plan['tokens_per_sample']} tokens ({req['image_sample_size']} px, "
        f"{req['num_sources']} source(s), {req['text_tokens']} text tokens)"
    )
    lines = [head, f"  transformer parameters {plan['transformer_parameters'] / 1e9:.2f} B, trainable "
             f"{plan['trainable_parameters'] / 1e6:.1f} M"]  # fmt: skip
    for key, value in gib.items():
        if key != "total":
            lines.append(f"  {key:<22} {value:8.1f} GiB")
    a = plan["block_activations"]
    hidden = plan.get("hidden_size") or 1
    lines.append(
        f"  (a block saves {a['per_image_token'] / hidden:.1f}·hidden bytes per image token, "
        f"{a['per_text_token'] / hidden:.1f}·hidden per text token, {a['constant'] / 2**20:.0f} MiB besides; "
        "counted on one real-width block in this mode; the peak is the larger of the VAE encode and "
        "gradients + activations + backward temporaries, on top of weights, optimizer and VAE)"
    )
    if gib["vae_encode"] > gib["gradients"] + gib["activations"] + gib["backward_temporaries"]:
        lines.append("  (the VAE encode sets the peak: a smaller --vae_mini_batch lowers it)")
    how = "its rows of one tensor at a time" if req["fsdp"] else "one block at a time, then moved to the GPU"
    lines.append(
        f"  host memory per process while the model loads: {plan['host_load_gib_per_process']:.2f} GiB ({how}; "
        "never the whole model), beside what the process itself holds (Python, libraries, the data loader)"
    )
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"  → peak {gib['total']:.1f} GiB: {verdict} in {req['gpu_memory_gib']:g} GiB (with a 10 % margin)")
    return "\n".join(lines)


def read_configs(model: str) -> tuple[dict, dict | None]:
    """(transformer config, VAE config) of a diffusers folder, or of a published model by name."""
    for family in families.FAMILIES.values():
        if model in family.plan_models:
            return family.plan_models[model]["transformer"], family.plan_models[model]["vae"]
    root = Path(model)
    transformer = json.loads((root / "transformer" / "config.json").read_text())
    vae_file = root / "vae" / "config.json"
    return transformer, (json.loads(vae_file.read_text()) if vae_file.is_file() else None)


CARDS = (24, 40, 48, 80, 141)  # GiB: RTX 4090/A10-class, A100 40 GB, L40S/A6000, A100/H100 80 GB, H200


# the modes of the which-card table: (name, what changes, runs on one GPU without FSDP, runs under FSDP)
VARIANTS = (
    ("LoRA", {"lora": True}, True, True),
    ("LoRA, fp8 base", {"lora": True, "base_weight_dtype": "float8_e4m3fn"}, True, False),
    ("LoRA, fp8 base, 8-bit Adam", {"lora": True, "base_weight_dtype": "float8_e4m3fn", "optimizer_bytes_per_param": 2},
     True, False),
    ("LoRA, CPU offload", {"lora": True, "cpu_offload": True}, False, True),
    ("full", {"lora": False}, True, True),
    ("full, CPU offload", {"lora": False, "cpu_offload": True}, False, True),
)  # fmt: skip


def card_table(transformer: torch.nn.Module, vae: torch.nn.Module, req: PlanRequest, gpus: int) -> list[dict]:
    """The request's run in every memory mode this trainer has — LoRA (bf16 or fp8 base, AdamW or 8-bit) and full
    fine-tuning, with or without CPU offload — on 1 GPU and on ``gpus`` (FSDP), with and without gradient
    checkpointing; per-GPU peak and the cards it fits (with the 10 % margin). CPU offload runs under FSDP, on one
    GPU too; fp8 and 8-bit Adam do not."""
    from dataclasses import replace

    rows = []
    for name, changes, single, sharded in VARIANTS:
        for processes in (1, gpus):
            fsdp = processes > 1 or bool(changes.get("cpu_offload"))
            if (fsdp and not sharded) or (not fsdp and not single):
                continue
            for checkpointing in (False, True):
                variant = replace(
                    req, **{"base_weight_dtype": "auto", "optimizer_bytes_per_param": 8, "cpu_offload": False},
                    processes=processes, fsdp=fsdp, gradient_checkpointing=checkpointing,
                )  # fmt: skip
                plan = memory_plan(transformer, vae, replace(variant, **changes))
                total = plan["gib_per_gpu"]["total"]
                rows.append(
                    {
                        "mode": name.replace("LoRA", f"LoRA r{req.lora_rank}"),
                        "gpus": processes,
                        "sharding": "FSDP" if fsdp else "one GPU",
                        "gradient_checkpointing": checkpointing,
                        "gib_per_gpu": total,
                        "host_gib_per_process": plan["host_gib_per_process"],
                        "fits": [card for card in CARDS if total <= MARGIN * card],
                    }
                )
    return rows


def format_card_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["mode", "GPUs", "checkpointing", "GiB per GPU", "host GiB", *(f"{c} GB" for c in CARDS)]
    body = [
        [
            r["mode"], f"{r['gpus']} ({r['sharding']})", "on" if r["gradient_checkpointing"] else "off",
            f"{r['gib_per_gpu']:.1f}", f"{r['host_gib_per_process']:.0f}" if r["host_gib_per_process"] else "—",
            *("yes" if c in r["fits"] else "—" for c in CARDS),
        ]
        for r in rows
    ]  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(x) for x in column) for column in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *body])
