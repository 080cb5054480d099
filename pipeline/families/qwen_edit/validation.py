"""Qwen-Image-Edit's validation renderer: rows with sources through ``QwenImageEditPlusPipeline``, rows without
through ``QwenImagePipeline``, both from stored prompt embeddings (no text encoder), true CFG with a blank negative."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from PIL import Image


@contextlib.contextmanager
def source_area(area: int):
    """Sources go to the VAE at the training area instead of the edit pipeline's fixed 1024² (restored after)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    before = edit_plus.VAE_IMAGE_SIZE
    edit_plus.VAE_IMAGE_SIZE = area
    try:
        yield
    finally:
        edit_plus.VAE_IMAGE_SIZE = before


class Renderer:
    """The two pipelines over the transformer being trained and the VAE already loaded."""

    def __init__(self, model_path: str, transformer, vae, area: int):
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline, QwenImagePipeline

        def scheduler():
            return FlowMatchEulerDiscreteScheduler.from_pretrained(model_path, subfolder="scheduler")

        parts: dict[str, Any] = {"vae": vae, "text_encoder": None, "tokenizer": None, "transformer": transformer}
        self.edit = QwenImageEditPlusPipeline(scheduler=scheduler(), processor=None, **parts)
        self.t2i = QwenImagePipeline(scheduler=scheduler(), **parts)
        for pipe in (self.edit, self.t2i):
            pipe.set_progress_bar_config(disable=True)
        self.area = area

    def render(
        self,
        embeds: dict[str, torch.Tensor],
        pictures: list[Image.Image],
        width: int,
        height: int,
        steps: int,
        guidance: float,
        generator: torch.Generator,
        device: torch.device,
    ) -> Image.Image:
        """One row: its stored positive (and, with guidance, negative) embedding, its source pictures."""
        positive = embeds["positive"]["prompt_embeds"]
        kwargs = {
            "prompt_embeds": positive[None].to(device),
            "prompt_embeds_mask": torch.ones((1, positive.shape[0]), dtype=torch.long).to(device),
            "true_cfg_scale": guidance,
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "generator": generator,
        }
        if guidance > 1:
            negative = embeds["negative"]["prompt_embeds"]
            kwargs["negative_prompt_embeds"] = negative[None].to(device)
            kwargs["negative_prompt_embeds_mask"] = torch.ones((1, negative.shape[0]), dtype=torch.long).to(device)
        pipe = self.edit if pictures else self.t2i
        if pictures:
            kwargs["image"] = pictures
        with source_area(self.area):
            return pipe(**kwargs).images[0]
