"""Offline tiny Qwen-Image-Edit-2509 model in the diffusers layout.

Real weights cannot be downloaded in CI, so tests, the demo and CI run on a
directory written here: the same classes, configs and file layout as the
published model, with tiny widths and random weights, and a tokenizer built
locally that carries the Qwen special tokens.  Everything is seeded, so the same
seed gives byte-identical weight files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.families.qwen_edit.prompts import EDIT_TEMPLATE, T2I_TEMPLATE

# Qwen2.5 special tokens in the order of their ids in the real vocabulary
# (151643 onwards); the tiny vocabulary keeps the order, so relative ids match.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Written by this project for the processor: the Qwen2-VL chat format
# (system turn, user turn with one vision block per image, generation prompt).
CHAT_TEMPLATE = (
    "{% set ns = namespace(images=0, videos=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set ns.images = ns.images + 1 %}"
    "{% if add_vision_id %}Picture {{ ns.images }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set ns.videos = ns.videos + 1 %}"
    "{% if add_vision_id %}Video {{ ns.videos }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tiny BPE is trained on: the templates the pipelines use plus
# everyday English and Chinese, so instructions tokenise into a few pieces.
_TOKENIZER_CORPUS = [
    EDIT_TEMPLATE,
    T2I_TEMPLATE,
    "Picture 1: Picture 2: Picture 3: system user assistant",
    "Change the sky to sunset. Make the car red. Remove the person on the left.",
    "Turn the photo black and white. Add a hat to the cat. Rotate the image.",
    "A photo of a landscape with a blue sky. A cat sitting on a windowsill.",
    "Merge the two characters into one scene. Put the object from picture 2 on the table.",
    "Flip the image horizontally. Increase the brightness. Make it look like a painting.",
    "把天空改成日落。把汽车变成红色。删除左边的人。给猫加一顶帽子。",
    "一张蓝天下的风景照。一只猫坐在窗台上。把两个角色合成到一个场景里。",
    "将图片水平翻转。提高亮度。把照片变成黑白。让它看起来像一幅画。",
    "0123456789 the of and to in is with on for a an",
]


@dataclass(frozen=True)
class ModelSize:
    """Widths and depths of the three networks; everything else follows the published configs."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    mrope_section: tuple[int, int, int]  # sums to text head_dim / 2
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    vision_full_attention: tuple[int, ...]
    dit_layers: int
    dit_head_dim: int
    dit_heads: int
    dit_axes_rope: tuple[int, int, int]  # sums to dit_head_dim
    vae_base_dim: int
    vae_res_blocks: int


SIZES = {
    # tests, demo, CI: seconds on a CPU
    "tiny": ModelSize(64, 2, 4, 2, 128, (2, 3, 3), 32, 2, 2, 64, (1,), 2, 16, 2, (4, 6, 6), 8, 1),
    # CPU benchmarks: the encoder forward dominates extraction time
    "bench": ModelSize(512, 8, 8, 2, 1536, (8, 12, 12), 128, 4, 4, 256, (3,), 4, 32, 4, (8, 12, 12), 16, 1),
    # the published Qwen-Image-Edit-2509 sizes (random weights, for GPU throughput checks)
    "real": ModelSize(
        3584, 28, 28, 4, 18944, (16, 24, 24), 1280, 32, 16, 3420, (7, 15, 23, 31), 60, 128, 24, (16, 56, 56), 96, 2
    ),
}
TINY_TEXT_HIDDEN = SIZES["tiny"].text_hidden


def build_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE deterministically and wrap it as ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from tokenizers import normalizers as tk_normalizers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = tk_normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    bpe.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer=trainer)
    model_json = json.loads(bpe.to_str())["model"]
    vocab = dict(model_json["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    base = len(vocab)
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[token] = base + offset
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS],
        special_tokens=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of every Qwen special token in ``tokenizer``."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def build_processor(tokenizer):
    """``Qwen2VLProcessor`` with the real model's image preprocessing settings."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = {"min_pixels": 3136, "max_pixels": 12845056}
    image_processor = Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, **pixels)
    video_processor = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, **pixels)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def text_encoder_config(tokenizer, size: ModelSize = SIZES["tiny"]) -> dict[str, Any]:
    """Qwen2.5-VL config at ``size``; token ids taken from ``tokenizer``."""
    ids = special_token_ids(tokenizer)
    vocab_size = ((len(tokenizer) + 63) // 64) * 64
    return {
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": size.text_hidden,
            "intermediate_size": size.text_intermediate,
            "num_hidden_layers": size.text_layers,
            "num_attention_heads": size.text_heads,
            "num_key_value_heads": size.text_kv_heads,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": list(size.mrope_section),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        "vision_config": {
            "depth": size.vision_depth,
            "hidden_size": size.vision_hidden,
            "intermediate_size": size.vision_intermediate,
            "num_heads": size.vision_heads,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": size.text_hidden,
            "fullatt_block_indexes": list(size.vision_full_attention),
        },
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


# what each generation of the family sets in transformer/config.json beyond the 2509 layout
VARIANTS: dict[str, dict[str, Any]] = {
    "2509": {},  # Qwen-Image-Edit-2509, FireRed-Image-Edit 1.0/1.1
    "2511": {"zero_cond_t": True},  # Qwen-Image-Edit-2511: source-image tokens modulated as at t = 0
}


def transformer_config(size: ModelSize = SIZES["tiny"], variant: str = "2509") -> dict[str, Any]:
    return {
        **VARIANTS[variant],
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": size.dit_layers,
        "attention_head_dim": size.dit_head_dim,
        "num_attention_heads": size.dit_heads,
        "joint_attention_dim": size.text_hidden,
        "axes_dims_rope": size.dit_axes_rope,
    }


def vae_config(size: ModelSize = SIZES["tiny"]) -> dict[str, Any]:
    return {
        "base_dim": size.vae_base_dim,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": size.vae_res_blocks,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
    }


# The published Qwen-Image scheduler configuration.
SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def build_components(seed: int = 0, size: str | ModelSize = "tiny", variant: str = "2509") -> dict[str, Any]:
    """All six pipeline components at ``size`` (a key of SIZES, or a ModelSize) and ``variant`` (a key of VARIANTS),
    seeded; weights in float32."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    torch.manual_seed(seed)
    dims = SIZES[size] if isinstance(size, str) else size
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**text_encoder_config(tokenizer, dims)))
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(**transformer_config(dims, variant))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(**vae_config(dims))
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return {
        "tokenizer": tokenizer,
        "processor": processor,
        "text_encoder": text_encoder.eval(),
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "scheduler": scheduler,
    }


def make_tiny_model(out_dir: str | Path, seed: int = 0, size: str | ModelSize = "tiny", variant: str = "2509") -> Path:
    """Write the model to ``out_dir`` in the Qwen-Image-Edit diffusers layout of ``variant`` (2509 or 2511)."""
    from diffusers import QwenImageEditPlusPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = QwenImageEditPlusPipeline(**build_components(seed, size, variant))
    pipe.save_pretrained(out, safe_serialization=True)
    return out
