"""Models for training: load the transformer and VAE, choose what trains, LoRA, export for diffusers."""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import families
from pipeline.common.flags import require_model_folder
from pipeline.errors import UserError
from pipeline.train.config.model import ModelConfig

log = logging.getLogger(__name__)


def weight_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype frozen weights are loaded in: the compute dtype of the mixed precision mode."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no", torch.float32)


def training_dtypes(mixed_precision: str | None, lora: bool) -> tuple[torch.dtype, torch.dtype]:
    """(transformer load dtype, VAE dtype) for a mode.

    LoRA: the frozen base and the VAE in the compute dtype (a 20B DiT is ~41 GB in
    bf16, ~82 GB in fp32); the adapter is cast to fp32 after it is added.
    Full fine-tuning: fp32 master weights (optimizer updates of 1e-5 relative size
    vanish in bf16), bf16 compute through autocast (DDP) or FSDP's param dtype;
    the frozen VAE in the compute dtype.
    """
    frozen = weight_dtype(mixed_precision)
    return (frozen if lora else torch.float32), frozen


STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@contextlib.contextmanager
def open_state_dict(path: str | Path):
    """(keys, shape(key), get(key) → tensor) of one weights file, without holding all of it in memory at once.

    safetensors: read tensor by tensor; a torch file: weights-only and memory-mapped (no pickle
    of objects).  A 20B transformer file is ~41 GB: loading it whole next to the model would
    double the host memory of every rank.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
        with handle:
            yield list(handle.keys()), lambda key: tuple(handle.get_slice(key).get_shape()), handle.get_tensor
        return
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    yield list(state), lambda key: tuple(state[key].shape), state.__getitem__


def load_into(module: torch.nn.Module, path: str | Path, what: str) -> torch.nn.Module:
    """Load a single state-dict file into ``module`` (the original tool's ``--transformer_path x.safetensors``).

    Known prefixes are removed; a key the module does not have, or of another shape, is an
    error before anything is copied; missing keys are allowed (a partial file) and reported.
    Tensors are copied one at a time into the module's own (dtype-converting ``copy_``).
    """
    from pipeline.train.engine.loading import file_names

    own = module.state_dict()
    with open_state_dict(path) as (keys, shape, get):
        names = file_names(keys, own, path, what)
        shapes = sorted(n for k, n in names.items() if shape(k) != tuple(own[n].shape))
        if shapes:
            raise UserError(f"--{what}_path {path}: shape differs for {shapes[:3]} (another model size?)")
        with torch.no_grad():
            for key, name in names.items():
                own[name].copy_(get(key))
    missing = len(own) - len(names)
    kept = f" ({missing} kept from the base)" if missing else ""
    log.info("loaded %d %s weights from %s%s", len(names), what, path, kept)
    return module


def _is_file(path: str | None) -> bool:
    return bool(path) and Path(path).suffix in STATE_DICT_SUFFIXES and Path(path).is_file()


def load_transformer(
    model_path: str, transformer_path: str | None = None, dtype: torch.dtype = torch.float32, family=None
):
    """The transformer of the model's family (detected from ``model_path`` when not given) the usual way — whole,
    on the CPU — for weights that are not all safetensors."""
    cls = (family or families.detect(model_path)).transformer_class()
    if transformer_path and not _is_file(transformer_path):
        return cls.from_pretrained(transformer_path, torch_dtype=dtype)
    transformer = cls.from_pretrained(model_path, subfolder="transformer", torch_dtype=dtype)
    return load_into(transformer, transformer_path, "transformer") if transformer_path else transformer


def load_vae(model_path: str, vae_path: str | None = None, dtype: torch.dtype = torch.float32, family=None):
    cls = (family or families.detect(model_path)).vae_class()
    if vae_path and not _is_file(vae_path):
        vae = cls.from_pretrained(vae_path, torch_dtype=dtype)
    else:
        vae = cls.from_pretrained(model_path, subfolder="vae", torch_dtype=dtype)
        if vae_path:
            load_into(vae, vae_path, "vae")
    return vae.eval().requires_grad_(False)


def load_scheduler(model_path: str, family=None):
    return (family or families.detect(model_path)).scheduler_class().from_pretrained(model_path, subfolder="scheduler")


def select_trainable(
    transformer: torch.nn.Module, modules: list[str], low_lr_modules: list[str]
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Full fine-tuning: parameters whose name contains a pattern train ("." matches all).

    Returns (normal-LR params, half-LR params); everything else is frozen.
    """
    normal, low = [], []
    for name, param in transformer.named_parameters():
        if any(p in name for p in low_lr_modules):
            param.requires_grad_(True)
            low.append(param)
        elif any(p in name for p in modules):
            param.requires_grad_(True)
            normal.append(param)
        else:
            param.requires_grad_(False)
    if not normal and not low:
        raise UserError(f"no transformer parameter matches --trainable_modules {modules} / {low_lr_modules}")
    return normal, low


def add_lora(transformer, rank: int, alpha: float, dropout: float, targets: list[str], lora_path: str | None,
             seed: int = 0, family=None) -> tuple[list[torch.nn.Parameter], dict[str, torch.Tensor]]:  # fmt: skip
    """Freeze the transformer and add a PEFT LoRA adapter; returns (its parameters, in fp32, and their initial
    values by name). The values come from ``seed`` and each parameter's name alone (:func:`loading.lora_init`),
    then from ``--lora_path`` where given, so every rank and mode starts from the same adapter. On a real model
    they are copied in here; on ``meta`` the caller fills them after allocating."""
    from peft import LoraConfig

    from pipeline.train.engine.loading import lora_init

    require_targets(transformer, targets)
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
    )
    with torch.random.fork_rng(devices=[]):  # PEFT's own init draws are replaced below: leave the global RNG be
        transformer.add_adapter(config)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    for param in trainable:  # adapters train in fp32 whatever the base dtype
        param.data = param.data.float()
    values = lora_init(transformer, seed)
    if lora_path:
        values.update(lora_file_values(lora_path, set(values), family or families.get(None)))
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if name in values and not param.is_meta:
                param.copy_(values[name])
    return trainable, values


def require_targets(transformer: torch.nn.Module, targets: list[str]) -> None:
    """Every LoRA target must name a module of the model, as PEFT matches them (the name, or its ending after a
    dot): PEFT ignores one that matches nothing, so a typo would train nothing there."""
    names = [n for n, _ in transformer.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
        examples = sorted({n.split(".", 2)[-1] for n in linears if n.startswith("transformer_blocks.0.")})[:8]
        raise UserError(
            f"--lora_target_modules {','.join(unmatched)}: no module of the transformer is named so (a block's "
            f"Linears: {', '.join(examples)})"
        )


def lora_file_values(lora_path: str, names: set[str], family) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors under the adapter's parameter names (diffusers or PEFT layout), read as the family's
    pipeline reads LoRA files."""
    if not Path(lora_path).is_file():
        raise UserError(f"--lora_path {lora_path}: no such file (a LoRA .safetensors file)")
    state = family.lora_io().lora_state_dict(lora_path)
    state = state[0] if isinstance(state, tuple) else state
    out, unexpected = {}, []
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        for part in ("lora_A", "lora_B"):
            name = name.replace(f".{part}.weight", f".{part}.default.weight")
        if name in names:
            out[name] = value
        else:
            unexpected.append(key)
    if unexpected:
        log.warning("unexpected keys in --lora_path: %s", unexpected[:5])
    return out


def trainable_state(transformer) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (what checkpoints hold)."""
    return {n: p.detach().cpu().contiguous() for n, p in transformer.named_parameters() if p.requires_grad}


@dataclass
class TrainingModels:
    """What a mode trains with. ``weights``: where the transformer's values are still to be read from when it is
    on ``meta`` (FSDP fills each rank's rows after sharding, ``parallel.FSDP.prepare``); None once filled."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    groups: list[dict]
    weights: object | None = None


def trainable_groups(transformer, model: ModelConfig, learning_rate: float, seed: int, family, source):
    """The optimizer's parameter groups of the mode (a LoRA adapter added, or the trainable set chosen, the
    low-rate modules at half the rate) and how the frozen base's blocks are quantized (None: they are not)."""
    if model.lora is None:
        normal, low = select_trainable(transformer, list(model.trainable_modules), list(model.low_lr_modules))
        groups = [{"params": normal, "lr": learning_rate}]
        if low:
            groups.append({"params": low, "lr": learning_rate / 2})
        return groups, None
    lora, quantize = model.lora, None
    targets = list(lora.target_modules or family.default_lora_targets)
    params, values = add_lora(transformer, lora.rank, lora.alpha, lora.dropout, targets, lora.init_path, seed, family)
    if source is not None:
        source.computed.update(values)
    if lora.base_weight_dtype != "auto":  # after the adapter: PEFT would cast a new adapter to its base's dtype
        from pipeline.train.engine.fp8 import FP8_DTYPES, quantize_block

        quantize = functools.partial(quantize_block, fp8_dtype=FP8_DTYPES[lora.base_weight_dtype])
        log.info("frozen base: the Linear weights of the blocks stored as %s", lora.base_weight_dtype)
    return [{"params": params, "lr": learning_rate}], quantize


def build_training_models(
    model: ModelConfig,
    mixed_precision: str | None,
    learning_rate: float,
    seed: int = 0,
    device: torch.device | str = "cpu",
    sharded: bool = False,
    family=None,
) -> TrainingModels:
    """The transformer in train mode (LoRA or the trainable set chosen), the frozen VAE, the scheduler and the
    optimizer parameter groups for a mode; dtypes follow :func:`training_dtypes`.

    From safetensors weights the transformer is built on ``meta`` and filled where it lives
    (``loading.py``): ``sharded`` (FSDP) leaves it on ``meta`` for each rank to fill its own rows after
    sharding; otherwise each block is filled and moved to ``device`` in turn. Other weight files load whole on
    the CPU, as before, and the caller moves them.
    """
    from pipeline.train.engine import loading

    require_model_folder(model.pretrained, "--pretrained_model_name_or_path")
    for flag, path in (("--transformer_path", model.transformer_path), ("--vae_path", model.vae_path)):
        if path and not _is_file(path):
            require_model_folder(path, flag)
    family = family or families.detect(model.pretrained)
    if model.transformer_path and not _is_file(model.transformer_path):
        families.check_transformer_folder(family, model.transformer_path)
    transformer_dtype, vae_dtype = training_dtypes(mixed_precision, model.lora is not None)
    source = loading.safetensors_source(model.pretrained, model.transformer_path)
    if source is None:
        transformer = load_transformer(model.pretrained, model.transformer_path, transformer_dtype, family)
    else:
        folder = model.transformer_path if model.transformer_path and not _is_file(model.transformer_path) else None
        config_folder = folder or str(Path(model.pretrained) / "transformer")
        transformer = loading.build_empty(family.transformer_class(), config_folder, transformer_dtype)
        loading.check_names(source, transformer)
    vae = load_vae(model.pretrained, model.vae_path, vae_dtype, family)
    scheduler = load_scheduler(model.pretrained, family)
    groups, quantize = trainable_groups(transformer, model, learning_rate, seed, family, source)
    if model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()  # diffusers returns models in eval mode: LoRA dropout would do nothing
    groups = [g for g in groups if g["params"]]
    if source is None:
        if quantize is not None:
            for block in transformer.transformer_blocks:
                quantize(block)
        return TrainingModels(transformer, vae, scheduler, groups)
    if sharded:
        return TrainingModels(transformer, vae, scheduler, groups, weights=source)
    names = {id(p): n for n, p in transformer.named_parameters()}  # allocating replaces the meta parameters
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]
    loading.materialize_blocks(transformer, source, torch.device(device), quantize)
    params = dict(transformer.named_parameters())
    groups = [{**g, "params": [params[n] for n in ns]} for g, ns in zip(groups, group_names, strict=True)]
    return TrainingModels(transformer, vae, scheduler, groups)


def make_optimizer(groups: list[dict], optim) -> torch.optim.Optimizer:
    """The run's optimizer over ``groups`` (AdamW by default; 8-bit AdamW or CAME when asked)."""
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


def first_nonfinite(model: torch.nn.Module, optimizer) -> str | None:
    """What of this rank's trainable weights and optimizer state holds NaN/Inf (None: all finite). Sharded
    parameters are checked by their local rows: each rank its share. One host sync per device, not per tensor
    (a 20B model has thousands of tensors)."""
    labelled = [(f"the trainable weight {n}", p) for n, p in model.named_parameters() if p.requires_grad]
    labelled += [(f"the optimizer's {k}", v) for state in optimizer.state.values() for k, v in state.items()]
    flags: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for label, value in labelled:
        local = value.to_local() if hasattr(value, "to_local") else value
        if torch.is_tensor(local) and local.is_floating_point():
            labels, found = flags.setdefault(local.device, ([], []))
            labels.append(label)
            found.append(torch.isfinite(local.detach()).all())
    for labels, found in flags.values():
        bad = (~torch.stack(found)).nonzero()
        if len(bad):
            return labels[int(bad[0])]
    return None


def export_transformer(transformer, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Full fine-tune → a diffusers ``transformer/`` folder (safetensors).

    ``state``: the full weights gathered from FSDP shards; they go into a copy of the
    model built on the ``meta`` device, so no second full model is allocated.
    """
    out = Path(out_dir) / "transformer"
    if state is not None:
        with torch.device("meta"):
            plain = type(transformer).from_config(transformer.config)
        plain.load_state_dict(state, assign=True)
        transformer = plain
    transformer.save_pretrained(out, safe_serialization=True)
    return out


def lora_layers(transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT names (``….lora_A.weight``), on the CPU."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, state_dict=state)
    return {k: v.detach().cpu().contiguous() for k, v in layers.items()}


def fold_scaling(transformer, layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``lora_B`` of every module times the scaling its forward applies (alpha / rank), so the file holds the
    update itself: a loader that reads alpha from metadata (diffusers) is told alpha = rank, and one that does
    not (ComfyUI, which reads only ``.alpha`` tensors and otherwise scales by 1) gets the same strength."""
    scaling = {
        name: float(module.scaling["default"])
        for name, module in transformer.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling
    }
    out = {}
    for key, value in layers.items():
        module = key.removeprefix("transformer.").split(".lora_")[0]
        if ".lora_B." in key and module in scaling:
            value = (value.float() * scaling[module]).to(value.dtype)
        out[key] = value
    return out


def export_lora(
    transformer,
    out_dir: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    export_format: str = "diffusers",
    family=None,
) -> dict[str, str]:
    """LoRA → the files ``export_format`` asks for; returns {format: path}. Each loads at the trained strength in
    both diffusers and ComfyUI.

    diffusers: ``pytorch_lora_weights.safetensors``, the alpha / rank scaling folded into
    ``lora_B`` (:func:`fold_scaling`) and the adapter config in its metadata with alpha =
    rank. comfyui: the family's ComfyUI layout (``.alpha`` tensors, which diffusers reads too).
    ``state``: the adapter weights gathered from FSDP shards. File names: the family's ``lora_files``.
    """
    from safetensors.torch import save_file

    family = family or families.get(None)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = lora_layers(transformer, state)
    config = transformer.peft_config["default"]
    written = {}
    if export_format in ("diffusers", "both"):
        alphas = dict(config.rank_pattern or {})  # alpha = rank everywhere: scaling 1, as folded
        metadata = {**config.to_dict(), "lora_alpha": config.r, "alpha_pattern": alphas, "use_rslora": False}
        family.lora_io().save_lora_weights(
            out, transformer_lora_layers=fold_scaling(transformer, layers), transformer_lora_adapter_metadata=metadata
        )
        written["diffusers"] = str(out / family.lora_files["diffusers"])
    if export_format in ("comfyui", "both"):
        meta = {"format": "pt", "lora_rank": str(config.r), "lora_alpha": str(config.lora_alpha)}
        path = out / family.lora_files["comfyui"]
        save_file(family.comfyui_lora(layers, config.lora_alpha), str(path), metadata=meta)
        written["comfyui"] = str(path)
    return written
