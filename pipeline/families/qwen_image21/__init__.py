"""The Qwen-Image 2.1 family: a 7.1B single-stream, block-causal DiT, a Qwen3-VL text encoder, an RGBA VAE at 16×.
Shard format v2: each variant stores only its text rows (the transformer overwrites the image-slot rows with
latents) and the slot layout; conditions are sized once at extraction (``--condition_resolution``) and shown to
the VAE at that size in training, never cropped.

Its pieces: ``encoder.py`` (prompt builder and Qwen3-VL encoder), ``forward.py`` (packing, token order, the
prediction, the prompt rebuilt from rows and slots), ``validation.py`` (the renderer), ``tiny.py`` (the offline
tiny model).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.families.base import ModelFamily, token_grid

# diffusers' QwenImage21Transformer2DModel defaults (the published layout: 32 layers, 32 heads × 128, context 4096)
QWEN_IMAGE_21_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": 64,
    "num_layers": 32,
    "attention_head_dim": 128,
    "num_attention_heads": 32,
    "context_in_dim": 4096,
    "mlp_ratio": 3,
    "axes_dims_rope": [16, 56, 56],
    "causal_condition": True,
}
ROPE_FRAMES = 8192  # positive frame positions of the transformer's RoPE table: text + Σ max(h, w) of the images


class QwenImage21(ModelFamily):
    name = "qwen_image21"
    shard_format_version = 2
    pipeline_classes = ("QwenImage21Pipeline",)
    vae_class_name = "AutoencoderKLQwenImage21"
    # ComfyUI's 2.1 loader maps transformer.-prefixed MLP keys onto the halves of its fused gate_up (it drops
    # diffusion_model.-prefixed ones)
    comfyui_prefix = "transformer."
    lora_pipeline_class = "QwenImage21Pipeline"
    transformer_classes = ("QwenImage21Transformer2DModel",)
    plan_models = {"qwen-image-2.1": {"transformer": QWEN_IMAGE_21_TRANSFORMER, "vae": None}}
    prompt_styles = ("diffusers",)
    prompt_style_help = {}  # one style: what QwenImage21Pipeline._get_qwen_prompt_embeds computes
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out")
    lora_files = {"diffusers": "pytorch_lora_weights.safetensors", "comfyui": "qwen_image21_lora_comfyui.safetensors"}
    max_batch_size = 1  # the transformer applies row 0's slot layout and image shapes to every row
    fixed_conditions = True
    pixel_channels = 4
    null_text = " "  # "Qwen has no bos token": the pipeline encodes empty text as a space
    validation_negative_prompt = " "
    description = "Qwen-Image 2.1"

    # ---- extraction -------------------------------------------------------------------------------------------
    def prompt_builder(self, model_path: str, style: str = "diffusers", crop_scale: int = 512,
                       condition_resolution: int = 1024):  # fmt: skip
        from pipeline.families.qwen_image21.encoder import PromptBuilder

        return PromptBuilder(model_path, condition_resolution)

    def prompt_encoder(self, model_path: str, device: str = "auto", dtype: str = "auto"):
        from pipeline.families.qwen_image21.encoder import PromptEncoder

        return PromptEncoder(model_path, device, dtype)

    def stored_embedding(self, output: torch.Tensor, inputs) -> tuple[torch.Tensor, Any]:
        """The text rows only, and the slots ``[[position, h32, w32], …]`` of the full post-drop sequence."""
        from pipeline.families.qwen_image21.encoder import slots_of

        slots = slots_of(inputs, output.shape[0])
        mask = torch.zeros(output.shape[0], dtype=torch.bool)
        for position, h, w in slots:
            mask[position : position + h * w] = True
        rows = output[~mask]
        return rows, {"shape": list(rows.shape), "slots": slots}

    # ---- the training forward ---------------------------------------------------------------------------------
    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        from pipeline.families.qwen_image21.forward import pack_latents

        return pack_latents(latents)

    def predict(self, transformer, noisy_target, target_latents, source_latents, batch, timestep, device, dtype):
        from pipeline.families.qwen_image21.forward import predict

        return predict(transformer, noisy_target, target_latents, source_latents, batch, timestep, device, dtype)

    def prompt_from_sample(self, rows: torch.Tensor, entry: Any) -> dict[str, torch.Tensor]:
        from pipeline.families.qwen_image21.forward import full_prompt

        slots = entry.get("slots", []) if isinstance(entry, dict) else []
        embeds, mask = full_prompt(rows, slots)
        return {"prompt_embeds": embeds, "image_pad_mask": mask}

    def source_sizes(self, aspects: list[list[float]], area: int) -> list[tuple[int, int]]:
        raise NotImplementedError("Qwen-Image 2.1 conditions keep the size stored at extraction (fixed_conditions)")

    def condition_pixels(self, data: bytes, size: tuple[int, int]) -> torch.Tensor:
        """RGBA, resized once with the VAE image processor's resize (PIL Lanczos), as ``QwenImage21Pipeline``
        prepares a condition for its VAE."""
        import numpy as np
        from diffusers.image_processor import VaeImageProcessor

        from pipeline.common.images import open_rgba

        resizer = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=64)
        resized = resizer.resize(open_rgba(data), width=size[0], height=size[1])
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1)

    def text_positions(self, sizes: list[tuple[int, int]]) -> int:
        """The RoPE frame table less every image's frame advance (max(h, w) latent tokens of 16 px)."""
        return ROPE_FRAMES - sum(max(w, h) // 16 for w, h in sizes)

    # ---- exports ----------------------------------------------------------------------------------------------
    def render_edit(self, pipe, pictures: list, prompt: str, size: int, steps: int, generator):
        return pipe(
            prompt=prompt, image=pictures, num_inference_steps=steps, output_resolution=size, generator=generator
        ).images[0]

    # ---- validation -------------------------------------------------------------------------------------------
    def validation_resolution(self, area: int) -> int:
        """The training side, at least 512: a smaller resolution puts a 4:3 condition under the processor's 65,536
        pixels (at 256: 288×224)."""
        return max(int(round(area**0.5)), 512)

    def validation_renderer(self, model_path: str, transformer, vae, area: int):
        from pipeline.families.qwen_image21.validation import Renderer

        return Renderer(model_path, transformer, vae, self.validation_resolution(area))

    # ---- the memory plan --------------------------------------------------------------------------------------
    def block_inputs(self, config, image_tokens: int, text_tokens: int, dtype: torch.dtype) -> dict[str, Any]:
        h, w = token_grid(image_tokens)
        return {
            "hidden_states": torch.randn(1, image_tokens, config.in_channels, dtype=dtype),
            "encoder_hidden_states": torch.randn(1, text_tokens, config.context_in_dim, dtype=dtype),
            "timestep": torch.tensor([0.5], dtype=dtype),
            "img_shapes": [[(1, h, w)]],
            "img_mask": torch.cat([torch.zeros(1, text_tokens, dtype=torch.bool),
                                   torch.ones(1, image_tokens // 4, dtype=torch.bool)], 1),
            "return_dict": False,
        }  # fmt: skip

    # ---- the offline kit --------------------------------------------------------------------------------------
    def make_tiny_model(self, out_dir, seed: int = 0, size: Any = "tiny", variant: str | None = None):
        from pipeline.families.qwen_image21.tiny import make_tiny_model

        return make_tiny_model(out_dir, seed)


FAMILY = QwenImage21()
