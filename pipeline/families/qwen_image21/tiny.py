"""Offline tiny Qwen-Image 2.1 in the diffusers layout: a Qwen3-VL encoder, the single-stream DiT and the RGBA VAE
at tiny widths with seeded random weights, and a processor whose tokenizer carries the Qwen special tokens. The
same seed gives byte-identical weight files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.families.qwen_edit.tiny import SCHEDULER_CONFIG, build_tokenizer, special_token_ids

TEXT_HIDDEN = 64  # the tiny encoder's width: the transformer's context_in_dim


def build_processor(tokenizer):
    """``Qwen3VLProcessor`` with Qwen3-VL's image settings: 16-pixel patches merged 2×2 (one ``<|image_pad|>`` per
    32×32 pixels), the processor's default minimum of 65536 pixels."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": 65536, "longest_edge": 16777216}
    image_processor = Qwen2VLImageProcessor(
        patch_size=16, temporal_patch_size=2, merge_size=2, size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def text_encoder_config(tokenizer) -> dict[str, Any]:
    ids = special_token_ids(tokenizer)
    vocab_size = ((len(tokenizer) + 63) // 64) * 64
    return {
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                                "mrope_interleaved": True},
            "pad_token_id": ids["<|endoftext|>"],
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [1],
        },
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }  # fmt: skip


def transformer_config() -> dict[str, Any]:
    return {
        "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "context_in_dim": TEXT_HIDDEN,
        "axes_dims_rope": (4, 6, 6),
    }  # fmt: skip


def vae_config() -> dict[str, Any]:
    return {"base_dim": 8, "decoder_base_dim": 8, "dim_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1}


def build_components(seed: int = 0) -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    torch.manual_seed(seed)
    text_encoder = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**text_encoder_config(tokenizer)))
    torch.manual_seed(seed + 1)
    transformer = QwenImage21Transformer2DModel(**transformer_config())
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage21(**vae_config())
    return {
        "processor": processor,
        "text_encoder": text_encoder.eval(),
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    }


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny Qwen-Image 2.1 to ``out_dir`` in the diffusers layout ``QwenImage21Pipeline`` loads."""
    from diffusers import QwenImage21Pipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    QwenImage21Pipeline(**build_components(seed)).save_pretrained(out, safe_serialization=True)
    return out
