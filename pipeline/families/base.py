"""What a model family provides: the one interface through which the rest of the project touches the model.

torchtitan's ``TrainSpec`` is the pattern: extraction, the stream, the engine, the
memory plan, the kit and the tools ask the family for everything that depends on
which model is trained, and nothing outside ``pipeline/families/`` names a model
class (``tests/unit/test_families.py`` reads every module to hold that). A family
is one object; its classes and heavy imports load only when a method is called.

What a new family must provide is every attribute and method below (the base
class raises for those it does not). What the tests require of an implementation:
its embeddings equal its diffusers pipeline's own encode path, its training
forward equals the pipeline's denoising call for fixed latents, its exports load
in diffusers (and ComfyUI, for LoRA), each on a tiny random model of the family
that its ``make_tiny_model`` writes offline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


class ConditionRefused(ValueError):
    """A condition image the family cannot encode as its pipeline would (say why): that line fails, permanently."""


def prompt_kind(batch: list) -> str:
    """The one kind (``edit`` or ``t2i``) of a batch of encoder inputs: one forward takes one kind."""
    kinds = {p.kind for p in batch}
    if len(kinds) != 1:
        raise ValueError(f"one forward takes one prompt kind, got {kinds}")
    return kinds.pop()


def stacked(values: list[torch.Tensor | None], lengths: list[int], fill: int, left: bool = False) -> torch.Tensor:
    """Per-prompt ``[L_i]`` tensors as one ``[B, max L]`` long tensor padded with ``fill`` on the right (or
    ``left``); a None leaves its row ``fill``."""
    longest = max(lengths)
    out = torch.full((len(values), longest), fill, dtype=torch.long)
    for row, (value, length) in enumerate(zip(values, lengths, strict=True)):
        if value is not None:
            out[row, slice(longest - length, longest) if left else slice(0, length)] = value
    return out


def token_grid(tokens: int) -> tuple[int, int]:
    """(h, w) of the squarest grid of ``tokens`` latent tokens (the plan's one-image probe)."""
    side = max(1, int(round(tokens**0.5)))
    while tokens % side:
        side -= 1
    return side, tokens // side


def _diffusers_class(name: str):
    """A class of diffusers by name (imported when first asked: families load nothing heavy at import)."""
    import diffusers

    if not name:
        raise NotImplementedError("the model family does not name this class")
    return getattr(diffusers, name)


class ModelFamily:
    """One model family. Attributes identify it; methods are grouped by the half of the project that calls them."""

    name: str = ""  # recorded in manifests and extraction identities
    shard_format_version: int = 1  # the format its tasks are written in
    pipeline_classes: tuple[str, ...] = ()  # model_index.json _class_name values this family owns
    transformer_classes: tuple[str, ...] = ()  # transformer/config.json _class_name values (the first is loaded)
    vae_class_name: str = ""  # the diffusers class of its VAE
    lora_pipeline_class: str = ""  # the diffusers pipeline class whose LoRA loader reads its LoRA files
    comfyui_prefix: str = ""  # what ComfyUI's LoRA loader for this model expects before the module names
    plan_models: dict[str, dict[str, Any]] = {}  # --plan name -> {"transformer": config, "vae": config or None}
    prompt_styles: tuple[str, ...] = ("diffusers",)  # the first is the default
    prompt_style_help: dict[str, str] = {}  # style -> what it computes (--help)
    default_lora_targets: tuple[str, ...] = ()  # the transformer's Linears a LoRA wraps by default
    max_batch_size: int | None = None  # rows per batch its transformer can take (None: any)
    # conditions sized once at extraction and shown to the VAE at that size (never cropped): condition_pixels
    fixed_conditions: bool = False
    pixel_channels: int = 3  # 3: RGB; 4: RGBA images in and out
    lora_files: dict[str, str] = {}  # LoRA export format -> the file name written
    null_text: str = ""  # the text of the null (empty-prompt) embedding
    validation_negative_prompt: str = " "  # the negative prompt of validation images rendered with CFG
    description: str = ""  # the checkpoints it covers, for messages and --help

    def _missing(self, what: str):
        raise NotImplementedError(f"model family {self.name!r} does not provide {what}")

    # ---- extraction -------------------------------------------------------------------------------------------
    def prompt_builder(self, model_path: str, style: str = "diffusers", crop_scale: int = 512,
                       condition_resolution: int = 1024):  # fmt: skip
        """Picklable: condition images and prompt texts → encoder inputs (``condition_images``, ``edit``, ``t2i``,
        ``drop_index``), in DataLoader workers. Its ``fixed_conditions``: whether the sample records each condition's
        size (the pixels training must show the VAE again)."""
        return self._missing("a prompt builder")

    def prompt_encoder(self, model_path: str, device: str = "auto", dtype: str = "auto"):
        """The text encoder on one device (``encode(inputs, drop_index)`` → one ``[L, D]`` tensor per prompt,
        ``hidden_size``, ``dtype``)."""
        return self._missing("a prompt encoder")

    def encoder_digest(self, model_path: str) -> str:
        """sha256 of the text encoder's config (``text_encoder/config.json``): which encoder made a task's
        embeddings."""
        return hashlib.sha256((Path(model_path) / "text_encoder" / "config.json").read_bytes()).hexdigest()

    def stored_embedding(self, output: torch.Tensor, inputs) -> tuple[torch.Tensor, Any]:
        """What a sample stores for one encoded prompt (``output`` of :meth:`prompt_encoder`, ``inputs`` of the
        builder): the rows written as ``emb_{variant}.npy`` and the variant's entry in the sample's json (None: the
        rows' shape, as shard format v1 records it)."""
        return self._missing("what a sample stores")

    def encoder_hidden_size(self, model_path: str) -> int:
        """The embedding width, from the text encoder's config (no weights read)."""
        config = json.loads((Path(model_path) / "text_encoder" / "config.json").read_text())
        return config.get("text_config", config).get("hidden_size")

    # ---- loading ----------------------------------------------------------------------------------------------
    def transformer_class(self):
        """The diffusers class of the transformer (the first of ``transformer_classes``)."""
        return _diffusers_class(self.transformer_classes[0])

    def vae_class(self):
        return _diffusers_class(self.vae_class_name)

    def scheduler_class(self):
        """The flow-matching scheduler both Qwen families ship (a family with another overrides it)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def lora_io(self):
        """The diffusers class whose ``lora_state_dict`` / ``save_lora_weights`` read and write this family's LoRA
        files (``lora_pipeline_class``)."""
        return _diffusers_class(self.lora_pipeline_class)

    # ---- the training forward ---------------------------------------------------------------------------------
    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` latents → the token sequence the transformer takes for them."""
        return self._missing("latent packing")

    def predict(
        self,
        transformer,
        noisy_target: torch.Tensor,
        target_latents: torch.Tensor,
        source_latents: list[torch.Tensor],
        batch: dict[str, Any],
        timestep: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The transformer's prediction for the packed noisy target's tokens only, as the pipeline's denoising loop
        calls it (token order, extra inputs, which slice of the output)."""
        return self._missing("the training forward")

    def prompt_from_sample(self, rows: torch.Tensor, entry: Any) -> dict[str, torch.Tensor]:
        """How training reads a stored embedding back: the stored rows and the variant's json entry → the per-sample
        tensors of the forward's prompt (``prompt_embeds`` ``[L, D]`` and any other ``[L]`` tensor it needs)."""
        return self._missing("how a stored embedding is read back")

    def source_sizes(self, aspects: list[list[float]], area: int) -> list[tuple[int, int]]:
        """The condition geometry of a batch: the (width, height) each source position is cropped to, from every
        sample's source aspects (``aspects[k]``: position k's) and the training area."""
        return self._missing("the condition geometry")

    def condition_pixels(self, data: bytes, size: tuple[int, int]) -> torch.Tensor:
        """A fixed condition's pixels for the VAE: stored bytes resized (never cropped) to ``size`` (width,
        height) as its pipeline resizes them, ``[pixel_channels, h, w]`` uint8."""
        return self._missing("fixed condition pixels")

    def text_positions(self, sizes: list[tuple[int, int]]) -> int:
        """How many prompt tokens the transformer can position next to images of these pixel sizes."""
        return self._missing("the text-length limit")

    # ---- exports ----------------------------------------------------------------------------------------------
    def comfyui_lora(self, layers: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """PEFT-named LoRA tensors → the keys ComfyUI's loader for this family maps: each module name under
        ``comfyui_prefix``, with a scalar ``<module>.alpha`` (ComfyUI scales by alpha / rank)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in layers.items():
            name = self.comfyui_prefix + key.removeprefix("transformer.")
            out[name] = value
            out.setdefault(f"{name.split('.lora_')[0]}.alpha", torch.tensor(float(alpha)))
        return out

    def inference_pipeline(self, model_path: str, transformer_folder: str | None = None):
        """The diffusers pipeline of ``model_path`` (its first ``pipeline_classes``), with an exported
        ``transformer/`` swapped in when given."""
        extra: dict[str, Any] = {}
        if transformer_folder is not None:
            extra["transformer"] = self.transformer_class().from_pretrained(transformer_folder)
        return _diffusers_class(self.pipeline_classes[0]).from_pretrained(model_path, **extra)

    def render_edit(self, pipe, pictures: list, prompt: str, size: int, steps: int, generator) -> Any:
        """One edit of ``pictures`` by ``prompt`` through :meth:`inference_pipeline`'s pipeline at ``size``² (the
        sources given to the VAE at that area too: quick on a CPU)."""
        return self._missing("an edit through its pipeline")

    # ---- validation -------------------------------------------------------------------------------------------
    def validation_resolution(self, area: int) -> int:
        """The condition resolution validation rows are encoded and rendered at, for a training area."""
        return int(round(area**0.5))

    def validation_renderer(self, model_path: str, transformer, vae, area: int):
        """Renders validation rows from stored prompt embeddings (no text encoder): ``render(embeds, pictures,
        width, height, steps, guidance, generator, device)`` → a PIL image; ``embeds``: ``positive`` and
        ``negative``, each what :meth:`prompt_from_sample` gives."""
        return self._missing("a validation renderer")

    # ---- the memory plan --------------------------------------------------------------------------------------
    def block_inputs(self, config, image_tokens: int, text_tokens: int, dtype: torch.dtype) -> dict[str, Any]:
        """The keyword arguments of one forward of a one-block transformer (``--plan``'s activation probe)."""
        return self._missing("the plan's block probe")

    # ---- the offline kit --------------------------------------------------------------------------------------
    def make_tiny_model(self, out_dir, seed: int = 0, size: Any = "tiny", variant: str | None = None):
        """A tiny random model of this family in its diffusers layout, written offline."""
        return self._missing("a tiny model")
