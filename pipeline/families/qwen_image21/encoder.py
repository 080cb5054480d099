"""Qwen-Image 2.1's prompt encoding, as ``QwenImage21Pipeline._get_qwen_prompt_embeds`` computes it.

:class:`PromptBuilder` (picklable, in DataLoader workers) sizes each condition as the
pipeline does — one resize to ``calculate_dimensions(R², aspect)``, sides ×32, with
the VAE image processor — keeps its alpha for the VAE and composites it on white for
the VLM; it writes the pipeline's raw template (``<imageK>`` vision blocks joined by
spaces, ``" "`` for empty text) and refuses a condition the processor would resize
again (under its minimum or over its maximum pixels: the slot count would no longer
match the latents). :class:`PromptEncoder` runs Qwen3-VL with a hook that hands back
the last decoder layer's output **before** the final norm (what the transformer was
trained on), strips the padding and drops the system prefix, whose length comes from
the processor's chat template as diffusers computes it — never a constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.common.devices import load_text_encoder
from pipeline.families.base import ConditionRefused, prompt_kind, stacked

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
T2I_TEMPLATE = (
    f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"
)
VISION_BLOCK = "<image{}><|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
DEFAULT_CONDITION_RESOLUTION = 1024  # diffusers' output_resolution


class ConditionTooSmall(ConditionRefused):
    """A condition whose resized size the processor would change again (under its minimum or over its maximum
    pixels): the slot count would no longer match the latents, and the transformer would fail."""


def condition_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) of a condition: ``resolution²`` at the picture's aspect, sides rounded to 32 (diffusers'
    ``calculate_dimensions``)."""
    ratio = width / height
    w = math.sqrt(resolution * resolution * ratio)
    return round(w / 32) * 32, round(w / ratio / 32) * 32


def on_white(picture: Image.Image) -> Image.Image:
    """What the VLM sees of an RGBA condition: composited on white (the VAE reads all four channels)."""
    if picture.mode != "RGBA":
        return picture
    white = Image.new("RGB", picture.size, (255, 255, 255))
    white.paste(picture, mask=picture.getchannel("A"))
    return white


@dataclass
class PromptInputs:
    """Encoder inputs for one prompt (no padding, no batch dimension)."""

    kind: str  # "edit" (with condition images) or "t2i"
    input_ids: torch.Tensor  # [L] int64
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None  # [L]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class PromptBuilder:
    """Builds :class:`PromptInputs` as the 2.1 pipeline does; ``condition_resolution`` is its ``output_resolution``."""

    def __init__(self, model_path: str | Path, condition_resolution: int = DEFAULT_CONDITION_RESOLUTION):
        from transformers import Qwen3VLProcessor

        self.processor = Qwen3VLProcessor.from_pretrained(str(model_path), subfolder="processor")
        self.condition_resolution = condition_resolution
        self.fixed_conditions = True  # training shows the VAE each condition at the size recorded here
        self.picture_mode = "RGBA"  # alpha kept for the VAE, composited on white for the VLM
        system = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
        drop = len(self.processor.apply_chat_template(system, tokenize=True, return_dict=False)[0])
        self.drop_index = {"edit": drop, "t2i": drop}
        self.image_pad_id = self.processor.tokenizer.encode(IMAGE_PAD)[0]
        size = self.processor.image_processor.size
        self.pixel_range = (size.get("shortest_edge", 0), size.get("longest_edge", math.inf))

    def condition_images(
        self, pictures: list[Image.Image], target_size: tuple[int, int] | None = None
    ) -> list[Image.Image]:
        """Each picture as RGBA at its condition size: the pixels the VLM (composited) and the VAE both see."""
        from diffusers.image_processor import VaeImageProcessor

        resizer = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=64)
        out = []
        for picture in pictures:
            width, height = condition_size(*picture.size, self.condition_resolution)
            low, high = self.pixel_range
            if not low <= width * height <= high:
                raise ConditionTooSmall(
                    f"a {picture.width}x{picture.height} condition becomes {width}x{height} = {width * height} "
                    f"pixels at --condition_resolution {self.condition_resolution}, outside the processor's "
                    f"{low}..{high}: raise --condition_resolution"
                )
            rgba = picture if picture.mode == "RGBA" else picture.convert("RGBA")
            out.append(resizer.resize(rgba, width=width, height=height))
        return out

    def edit(self, condition_images: list[Image.Image], instruction: str) -> PromptInputs:
        """The prompt over already-sized condition images (:meth:`condition_images`)."""
        blocks = " ".join(VISION_BLOCK.format(k + 1) for k in range(len(condition_images)))
        text = T2I_TEMPLATE.format(blocks + (instruction or " "))
        return self._inputs("edit", text, [on_white(p) for p in condition_images])

    def t2i(self, instruction: str) -> PromptInputs:
        return self._inputs("t2i", T2I_TEMPLATE.format(instruction or " "), None)

    def _inputs(self, kind: str, text: str, images: list[Image.Image] | None) -> PromptInputs:
        kwargs = {"images": images} if images else {}
        batch = self.processor(text=[text], padding=True, padding_side="left", return_tensors="pt", **kwargs)
        types = batch.get("mm_token_type_ids")
        return PromptInputs(
            kind, batch["input_ids"][0], batch.get("pixel_values"), batch.get("image_grid_thw"),
            None if types is None else types[0],
        )  # fmt: skip


class PromptEncoder:
    """Qwen3-VL on one device; many prompts of one length per forward (no padding: bitwise a one-prompt forward)."""

    def __init__(self, model_path: str | Path, device: str = "auto", dtype: str = "auto"):
        from transformers import Qwen3VLForConditionalGeneration

        self.model, self.device, self.dtype, self.hidden_size, self.pad_token_id = load_text_encoder(
            Qwen3VLForConditionalGeneration, model_path, device, dtype
        )

    @torch.no_grad()
    def encode(self, batch: list[PromptInputs], drop_index: dict[str, int]) -> list[torch.Tensor]:
        """Per prompt: the pre-norm last-layer states of its tokens after the system prefix, ``[L, D]``."""
        kind, lengths = prompt_kind(batch), [p.length for p in batch]
        longest = max(lengths)
        ids = stacked([p.input_ids for p in batch], lengths, self.pad_token_id, left=True)  # as the pipeline pads
        mask = stacked([torch.ones(n, dtype=torch.long) for n in lengths], lengths, 0, left=True)
        types = stacked([p.mm_token_type_ids for p in batch], lengths, 0, left=True)
        kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if kind == "edit":
            kwargs["pixel_values"] = torch.cat([p.pixel_values for p in batch]).to(self.device)
            kwargs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in batch]).to(self.device)
        if any(p.mm_token_type_ids is not None for p in batch):
            kwargs["mm_token_type_ids"] = types.to(self.device)
        text_model = getattr(self.model.model, "language_model", self.model.model)
        handle = text_model.norm.register_forward_hook(lambda module, args, output: args[0])  # pre-norm states
        try:
            hidden = self.model.model(**kwargs, output_hidden_states=True).hidden_states[-1]  # no LM head
        finally:
            handle.remove()
        drop = drop_index[kind]
        return [hidden[row, longest - p.length + drop :] for row, p in enumerate(batch)]


def slots_of(inputs: PromptInputs, rows: int) -> list[list[int]]:
    """``[[position, h32, w32], …]`` of an encoded prompt of ``rows`` post-drop rows: each condition's slot block
    (its ``<|image_pad|>`` rows, marked by ``mm_token_type_ids``), ``h32 × w32`` long, in the image grid's order."""
    if inputs.image_grid_thw is None:
        return []
    drop = inputs.length - rows
    pads = (inputs.mm_token_type_ids[drop:] == 1).to(torch.long).tolist()
    starts = [i for i, flag in enumerate(pads) if flag and (i == 0 or not pads[i - 1])]
    grids = [(int(h) // 2, int(w) // 2) for _, h, w in inputs.image_grid_thw.tolist()]  # 16-px patches merged 2×2
    if len(starts) != len(grids):
        raise ValueError(f"{len(starts)} slot blocks for {len(grids)} condition images")
    return [[start, h, w] for start, (h, w) in zip(starts, grids, strict=True)]


def slot_layout(input_ids: torch.Tensor, drop: int, image_pad_id: int) -> list[list[int]]:
    """``[[position, count], …]``: each run of ``<|image_pad|>`` rows in the post-drop sequence (one run per
    condition, in order), as diffusers' ``image_pad_mask`` marks them."""
    pads = (input_ids[drop:] == image_pad_id).tolist()
    runs, start = [], None
    for position, is_pad in enumerate([*pads, False]):
        if is_pad and start is None:
            start = position
        elif not is_pad and start is not None:
            runs.append([start, position - start])
            start = None
    return runs
