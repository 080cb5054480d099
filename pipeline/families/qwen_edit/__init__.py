"""The Qwen-Image-Edit family: Qwen-Image-Edit-2509 and -2511, FireRed-Image-Edit 1.0/1.1 (a 20B MMDiT, a
Qwen2.5-VL text encoder, an RGB VAE at 8×). Shard format v1.

Its pieces: ``prompts.py`` (templates, drop indices), ``encoder.py`` (prompt builder and Qwen2.5-VL encoder),
``geometry.py`` (condition images), ``forward.py`` (packing, token order, the prediction, the text limit),
``validation.py`` (the renderer), ``tiny.py`` (the offline tiny model).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.families.base import ModelFamily, token_grid

# transformer/config.json of Qwen/Qwen-Image-Edit-2509 (as published; written here, not downloaded)
QWEN_IMAGE_EDIT_2509_TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
# Qwen/Qwen-Image-Edit-2511: the same layout with zero_cond_t, which doubles the timestep embedding's batch and
# modulates each image token by its own index (target or source): per block, the shift, scale and gate become
# full [batch, image tokens, hidden] tensors instead of one row per sample (counted by the activation measurement)
QWEN_IMAGE_EDIT_2511_TRANSFORMER = {**QWEN_IMAGE_EDIT_2509_TRANSFORMER, "zero_cond_t": True}

# every Linear of a block, both streams (the original tool's targets, in its order)
DEFAULT_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1",
)  # fmt: skip


class QwenEdit(ModelFamily):
    name = "qwen_edit"
    pipeline_classes = ("QwenImageEditPlusPipeline",)
    vae_class_name = "AutoencoderKLQwenImage"
    comfyui_prefix = "diffusion_model."  # ComfyUI's Qwen-Image layout
    lora_pipeline_class = "QwenImagePipeline"
    transformer_classes = ("QwenImageTransformer2DModel",)
    plan_models = {
        "qwen-image-edit-2509": {"transformer": QWEN_IMAGE_EDIT_2509_TRANSFORMER, "vae": None},
        "qwen-image-edit-2511": {"transformer": QWEN_IMAGE_EDIT_2511_TRANSFORMER, "vae": None},
    }
    prompt_styles = ("diffusers", "firered")
    prompt_style_help = {
        "diffusers": "exactly what QwenImageEditPlusPipeline.encode_prompt computes (default)",
        "firered": "the original tool's chat-template variant with bucket-cropped condition images",
    }
    default_lora_targets = DEFAULT_LORA_TARGETS
    lora_files = {
        "diffusers": "pytorch_lora_weights.safetensors",
        "comfyui": "qwen_image_edit_lora_comfyui.safetensors",
    }
    null_text = ""
    validation_negative_prompt = " "  # diffusers' examples: a blank negative prompt for true CFG
    description = "Qwen-Image-Edit-2509/2511, FireRed-Image-Edit 1.x"

    # ---- extraction -------------------------------------------------------------------------------------------
    def prompt_builder(self, model_path: str, style: str = "diffusers", crop_scale: int = 512,
                       condition_resolution: int = 1024):  # fmt: skip
        from pipeline.families.qwen_edit.encoder import PromptBuilder

        return PromptBuilder(model_path, style, crop_scale)

    def prompt_encoder(self, model_path: str, device: str = "auto", dtype: str = "auto"):
        from pipeline.families.qwen_edit.encoder import PromptEncoder

        return PromptEncoder(model_path, device, dtype)

    def stored_embedding(self, output: torch.Tensor, inputs) -> tuple[torch.Tensor, Any]:
        return output, None  # v1: every row, its shape recorded

    # ---- the training forward ---------------------------------------------------------------------------------
    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        from pipeline.families.qwen_edit.forward import pack_latents

        return pack_latents(latents)

    def predict(self, transformer, noisy_target, target_latents, source_latents, batch, timestep, device, dtype):
        from pipeline.families.qwen_edit.forward import predict

        return predict(transformer, noisy_target, target_latents, source_latents, batch, timestep, device, dtype)

    def prompt_from_sample(self, rows: torch.Tensor, entry: Any) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": rows}

    def source_sizes(self, aspects: list[list[float]], area: int) -> list[tuple[int, int]]:
        """Sources are cropped like the target: each position at the batch's mean aspect, the training area."""
        from pipeline.crops import crop_size

        return [crop_size(float(np.mean(position)), area) for position in aspects]

    def condition_pixels(self, data: bytes, size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError("Qwen-Image-Edit crops its sources like the target (fixed_conditions is False)")

    def text_positions(self, sizes: list[tuple[int, int]]) -> int:
        from pipeline.families.qwen_edit.forward import text_positions

        return text_positions(sizes)

    # ---- exports ----------------------------------------------------------------------------------------------
    def render_edit(self, pipe, pictures: list, prompt: str, size: int, steps: int, generator):
        from pipeline.families.qwen_edit.validation import source_area

        with source_area(size * size):
            return pipe(
                image=pictures, prompt=prompt, num_inference_steps=steps, height=size, width=size, generator=generator
            ).images[0]

    # ---- validation -------------------------------------------------------------------------------------------
    def validation_resolution(self, area: int) -> int:
        return int(round(area**0.5))  # unused by its builder: conditions are 384² (or the firered crop)

    def validation_renderer(self, model_path: str, transformer, vae, area: int):
        from pipeline.families.qwen_edit.validation import Renderer

        return Renderer(model_path, transformer, vae, area)

    # ---- the memory plan --------------------------------------------------------------------------------------
    def block_inputs(self, config, image_tokens: int, text_tokens: int, dtype: torch.dtype) -> dict[str, Any]:
        h, w = token_grid(image_tokens)
        return {
            "hidden_states": torch.randn(1, image_tokens, config.in_channels, dtype=dtype),
            "encoder_hidden_states": torch.randn(1, text_tokens, config.joint_attention_dim, dtype=dtype),
            "encoder_hidden_states_mask": torch.ones(1, text_tokens, dtype=torch.long),
            "timestep": torch.tensor([0.5], dtype=dtype),
            "img_shapes": [[(1, h, w)]],
            "return_dict": False,
        }

    # ---- the offline kit --------------------------------------------------------------------------------------
    def make_tiny_model(self, out_dir, seed: int = 0, size: Any = "tiny", variant: str | None = None):
        from pipeline.families.qwen_edit.tiny import make_tiny_model

        return make_tiny_model(out_dir, seed, size, variant or "2509")


FAMILY = QwenEdit()
