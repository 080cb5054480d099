"""Qwen-Image 2.1's validation renderer: ``QwenImage21Pipeline`` over the transformer being trained, from stored
prompt embeddings (no text encoder). The pipeline's ``__call__`` takes no slot mask with precomputed embeddings and
conditions, so a subclass hands its ``encode_prompt`` the stored one — the rest of the call is the pipeline's own.
Its RGBA results are flattened on white for the sheet."""

from __future__ import annotations

import torch
from PIL import Image


def _pipeline_class():
    from diffusers import QwenImage21Pipeline

    class StoredPromptPipeline(QwenImage21Pipeline):
        """``encode_prompt`` returns the stored embeddings and slot masks set on the instance."""

        stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def encode_prompt(self, prompt=None, image=None, device=None, num_images_per_prompt=1, prompt_embeds=None,
                          prompt_embeds_mask=None, image_pad_mask=None):  # fmt: skip
            which = "negative" if prompt_embeds is self.stored["negative"][0] else "positive"
            embeds, mask = self.stored[which]
            return embeds.to(device), None, mask.to(device)

    return StoredPromptPipeline


class Renderer:
    def __init__(self, model_path: str, transformer, vae, resolution: int):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import Qwen3VLProcessor

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_path, subfolder="scheduler")
        processor = Qwen3VLProcessor.from_pretrained(model_path, subfolder="processor")  # its drop index, no encoder
        self.pipe = _pipeline_class()(
            scheduler=scheduler, vae=vae, text_encoder=None, processor=processor, transformer=transformer
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.resolution = resolution  # diffusers' output_resolution: the conditions' size, as their embeddings

    def render(self, embeds, pictures, width, height, steps, guidance, generator, device) -> Image.Image:
        """One row from its stored prompt (``positive`` / ``negative``: ``(embeddings [L, D], slot mask [L])``)."""
        self.pipe.stored = {
            which: (embeds[which]["prompt_embeds"][None], embeds[which]["image_pad_mask"][None])
            for which in ("positive", "negative")
        }
        kwargs = {
            "prompt_embeds": self.pipe.stored["positive"][0],
            "true_cfg_scale": guidance,
            "num_inference_steps": steps,
            "generator": generator,
            "output_resolution": self.resolution,
        }
        if guidance > 1:
            kwargs["negative_prompt_embeds"] = self.pipe.stored["negative"][0]
        if pictures:
            kwargs["image"] = pictures
        else:
            kwargs["height"], kwargs["width"] = height, width
        image = self.pipe(**kwargs).images[0]
        if image.mode == "RGBA":
            flat = Image.new("RGB", image.size, (255, 255, 255))
            flat.paste(image, mask=image.getchannel("A"))
            return flat
        return image
