"""Qwen-Image-Edit's prompt encoding: token ids in DataLoader workers, batched Qwen2.5-VL hidden states on the device.

:class:`PromptBuilder` is small and picklable, so DataLoader workers turn images
and text into exactly the processor/tokenizer inputs diffusers builds at
inference.  :class:`PromptEncoder` runs the Qwen2.5-VL text encoder on many
prompts per forward and returns each prompt's last hidden states with the
template prefix dropped, as ``encode_prompt`` does.  Online encoding during
training uses the same two classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.common.devices import load_text_encoder
from pipeline.families.base import prompt_kind, stacked
from pipeline.families.qwen_edit import geometry, prompts

log = logging.getLogger(__name__)

T2I_MAX_TOKENS = 1024  # diffusers' tokenizer_max_length for QwenImagePipeline


@dataclass
class PromptInputs:
    """Encoder inputs for one prompt (no padding, no batch dimension)."""

    kind: str  # "edit" (processor, with images) or "t2i" (tokenizer only)
    input_ids: torch.Tensor  # [L] int64
    pixel_values: torch.Tensor | None = None  # [patches, dim] float32
    image_grid_thw: torch.Tensor | None = None  # [images, 3]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class PromptBuilder:
    """Builds :class:`PromptInputs` in the chosen prompt style."""

    def __init__(self, model_path: str | Path, style: str = "diffusers", image_sample_size: int = 512):
        from transformers import AutoTokenizer, Qwen2VLProcessor

        if style not in prompts.PROMPT_STYLES:
            raise ValueError(f"unknown prompt style {style!r}; choose from {prompts.PROMPT_STYLES}")
        self.style = style
        self.image_sample_size = image_sample_size  # the firered crop table's scale
        self.processor = Qwen2VLProcessor.from_pretrained(str(model_path), subfolder="processor")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path), subfolder="tokenizer")
        self.drop_index = prompts.drop_indices(self.tokenizer)
        self.fixed_conditions = False  # sources are cropped like the target in training
        self.picture_mode = "RGB"  # what diffusers' load_image gives

    def condition_images(
        self, pictures: list[Image.Image], target_size: tuple[int, int] | None = None
    ) -> list[Image.Image]:
        """Resize as inference does (diffusers), or crop to the target's table entry then resize (firered).

        ``target_size`` is the sample's target image (width, height).
        """
        if self.style == "firered":
            if target_size is None:
                raise ValueError("firered prompts need the target image's size")
            return [geometry.firered_condition_image(p, tuple(target_size), self.image_sample_size) for p in pictures]
        return [geometry.condition_image(p) for p in pictures]

    def edit(self, condition_images: list[Image.Image], instruction: str) -> PromptInputs:
        """Edit prompt over already-resized condition images."""
        n = len(condition_images)
        if self.style == "firered":
            text = self.processor.apply_chat_template(
                prompts.firered_messages(instruction, n), add_generation_prompt=True
            )
        else:
            text = prompts.edit_prompt_text(instruction, n)
        batch = self.processor(text=[text], images=condition_images, padding=True, return_tensors="pt")
        return PromptInputs("edit", batch["input_ids"][0], batch["pixel_values"], batch["image_grid_thw"])

    def t2i(self, instruction: str) -> PromptInputs:
        batch = self.tokenizer(
            [prompts.t2i_prompt_text(instruction)],
            max_length=T2I_MAX_TOKENS + self.drop_index["t2i"],
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        return PromptInputs("t2i", batch["input_ids"][0])


class PromptEncoder:
    """Qwen2.5-VL text encoder on one device; many prompts per forward."""

    def __init__(self, model_path: str | Path, device: str = "auto", dtype: str = "auto"):
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.model, self.device, self.dtype, self.hidden_size, self.pad_token_id = load_text_encoder(
            Qwen2_5_VLForConditionalGeneration, model_path, device, dtype
        )

    @torch.no_grad()
    def encode(self, batch: list[PromptInputs], drop_index: dict[str, int]) -> list[torch.Tensor]:
        """Last hidden states per prompt, template prefix dropped, in the encoder's dtype, on its device.

        Prompts of one length run without padding, which keeps every result
        bit-identical to a one-prompt forward (``encode_prompt`` at inference);
        mixed lengths are right-padded with an attention mask.
        """
        kind, lengths = prompt_kind(batch), [p.length for p in batch]
        ids = stacked([p.input_ids for p in batch], lengths, self.pad_token_id)
        mask = stacked([torch.ones(n, dtype=torch.long) for n in lengths], lengths, 0)
        kwargs = {}
        if kind == "edit":
            kwargs["pixel_values"] = torch.cat([p.pixel_values for p in batch]).to(self.device)
            kwargs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in batch]).to(self.device)
        # The base model's last_hidden_state is hidden_states[-1] of the full model (the
        # final norm applied), without computing the LM head over the vocabulary.
        hidden = self.model.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
        ).last_hidden_state
        drop = drop_index[kind]
        return [hidden[row, drop : p.length] for row, p in enumerate(batch)]
