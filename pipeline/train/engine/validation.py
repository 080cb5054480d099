"""Validation images: the current weights render a few fixed rows with the diffusers pipelines.

Rows are read like extraction input (0-3 ``source_image``, ``instruction``).  Their
prompt embeddings are computed once, before training, with the same prompt code
as extraction (``--prompt_style diffusers``: what ``encode_prompt`` computes), and
the text encoder is freed; rendering then needs only the transformer being
trained and the VAE already loaded, through the model family's renderer (for
Qwen-Image-Edit: the Edit-Plus pipeline for rows with sources, the text-to-image
pipeline for rows without); each row has its own fixed seed, so a rerun of the
same step gives the same pixels.

Images are rendered at the training resolution (``--image_sample_size``² area, the
sources given to the VAE at that area as well, as in training), which keeps the
cost of a validation small next to the run.

Distributed: under DDP the ranks split the rows (rank r renders rows r, r + world,
…, with the unwrapped transformer, so no collective runs and a handful of rows
on 8 GPUs takes one row's time); under FSDP every rank renders every row in
lockstep (each forward all-gathers the sharded weights) and rank 0 writes them.
Rank 0 assembles the contact sheet once all rows are written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline import families
from pipeline.common import images as imaging
from pipeline.common.preview import contact_sheet
from pipeline.crops import crop_size
from pipeline.train.config.run import ValidationConfig

log = logging.getLogger(__name__)


@dataclass
class ValidationRow:
    line: int
    sources: list[str]
    instruction: str


def read_rows(path: str, storage_options: dict | None = None) -> list[ValidationRow]:
    """The rows of ``--validation_jsonl``, read with the extraction input's schema (``pipeline.common.records``:
    relative image paths from the JSONL's folder, 0-3 sources, the same text fields) without a target; each needs an
    instruction. A bad row is an error naming file, line and field (checked at start-up)."""
    from pipeline.common.records import iter_lines, parse_line

    rows = []
    for number, text in iter_lines(path, storage_options):
        record = parse_line(text, path, number, require_target=False)
        instruction = record.instruction or record.instruction_cn
        if not instruction:
            raise ValueError(
                f"{path} line {number}, field 'instruction': missing or empty (instruction or instruction_cn)"
            )
        rows.append(ValidationRow(number + 1, list(record.sources), instruction))  # 1-based, as it always was
    if not rows:
        raise ValueError(f"{path}: no validation rows")
    return rows


def load_picture(url: str, storage_options: dict | None = None) -> Image.Image:
    """A source image as extraction loads it (byte and pixel limits, timeout, EXIF orientation, RGB)."""
    try:
        return imaging.load(url, storage_options).rgb
    except imaging.ImageLoadError as exc:
        raise ValueError(f"--validation_jsonl: cannot use the source image {url}: {exc}") from None


class Validator:
    """Prompt embeddings prepared once; :meth:`render` draws every row with the given transformer."""

    def __init__(
        self,
        config: ValidationConfig,
        model_path: str,
        image_sample_size: int,
        output_dir: str,
        storage_options: dict | None = None,
        family=None,
    ):
        self.config = config
        self.model_path = model_path
        self.family = family or families.detect(model_path)
        self.area = image_sample_size**2
        self.output_dir = Path(output_dir) / "validation"
        self.rows = read_rows(config.jsonl, storage_options)
        self.pictures = [[load_picture(s, storage_options) for s in row.sources] for row in self.rows]
        self.embeds: dict[int, dict[str, torch.Tensor]] = {}

    def rows_of(self, rank: int, world: int, lockstep: bool) -> list[int]:
        """The rows one rank renders: all of them in lockstep (FSDP), else every ``world``-th (DDP splits them)."""
        return list(range(len(self.rows))) if lockstep else list(range(rank, len(self.rows), world))

    def prepare(self, device: torch.device, indices: list[int]) -> None:
        """Encode these rows' prompts (and the blank negative) with the text encoder, then free it."""
        if not indices:
            return
        started = time.perf_counter()
        resolution = self.family.validation_resolution(self.area)
        builder = self.family.prompt_builder(self.model_path, "diffusers", condition_resolution=resolution)
        encoder = self.family.prompt_encoder(self.model_path, str(device), "auto")
        negative_text = self.family.validation_negative_prompt
        for index in indices:
            row, pictures = self.rows[index], self.pictures[index]
            if pictures:
                conditions = builder.condition_images(pictures)
                inputs = [builder.edit(conditions, row.instruction), builder.edit(conditions, negative_text)]
            else:
                inputs = [builder.t2i(row.instruction), builder.t2i(negative_text)]
            prompts = []
            for prompt_inputs in inputs:  # as training reads a stored embedding back
                rows, entry = self.family.stored_embedding(
                    encoder.encode([prompt_inputs], builder.drop_index)[0].float().cpu(), prompt_inputs
                )
                prompts.append(self.family.prompt_from_sample(rows, entry))
            self.embeds[index] = {"positive": prompts[0], "negative": prompts[1]}
        del encoder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("validation: %d row(s) encoded in %.1fs", len(indices), time.perf_counter() - started)

    def render(self, transformer, vae, device: torch.device, autocast) -> dict[int, Image.Image]:
        """An image for each row :meth:`prepare` encoded (collective under FSDP: every rank renders all)."""
        if not self.embeds:
            return {}
        renderer = self.family.validation_renderer(self.model_path, transformer, vae, self.area)
        images = {}
        was_training = transformer.training
        transformer.eval()
        try:
            with autocast:
                for index, embeds in sorted(self.embeds.items()):
                    pictures = self.pictures[index]
                    aspect = pictures[-1].width / pictures[-1].height if pictures else 1.0
                    width, height = crop_size(aspect, self.area)
                    images[index] = renderer.render(
                        embeds, pictures, width, height, self.config.inference_steps, self.config.guidance_scale,
                        torch.Generator("cpu").manual_seed(self.config.seed + index), device,
                    )  # fmt: skip
        finally:
            transformer.train(was_training)
        return images

    def folder(self, step: int) -> Path:
        return self.output_dir / f"step-{step:06d}"

    def save_rows(self, step: int, images: dict[int, Image.Image]) -> None:
        """``validation/step-XXXXXX/row-NN.png`` for the rows this rank rendered."""
        folder = self.folder(step)
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in images.items():
            image.save(folder / f"row-{index:02d}.png")

    def save_sheet(self, step: int) -> tuple[Path, list[Image.Image]]:
        """Once every rank saved its rows: ``sheet.png`` (sources → result, instruction under it); all images."""
        folder = self.folder(step)
        images = [Image.open(folder / f"row-{i:02d}.png").convert("RGB") for i in range(len(self.rows))]
        rows = [
            ([*pictures, image], row.instruction)
            for row, pictures, image in zip(self.rows, self.pictures, images, strict=True)
        ]
        contact_sheet(rows, font_path=self.config.caption_font).save(folder / "sheet.png")
        return folder, images

    def due(self, step: int, last: int) -> bool:
        return step % self.config.steps == 0 or step == last

    def run(self, step: int, strategy, vae, accelerator) -> float:
        """Collective: render with the current weights, write the rows and the sheet, log the sheet; the seconds
        it took (logged apart from the training steps). Under FSDP every rank renders all rows in lockstep."""
        started = time.perf_counter()
        accelerator.wait_for_everyone()
        images = self.render(strategy.unwrapped(), vae, accelerator.device, accelerator.autocast())
        if (
            accelerator.is_main_process or not strategy.renders_every_row()
        ):  # FSDP: every rank rendered all rows, rank 0 writes them
            self.save_rows(step, images)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            folder, all_images = self.save_sheet(step)
            log_images(accelerator.trackers, step, folder, all_images)
        seconds = time.perf_counter() - started
        accelerator.log({"validation_seconds": seconds}, step=step)
        if accelerator.is_main_process:
            log.info("step %d: validation images in %.1fs", step, seconds)
        return seconds


def log_images(trackers, step: int, folder: Path, images: list) -> None:
    """The sheet (and each image, for wandb) to the experiment trackers."""
    import numpy as np

    sheet = np.asarray(Image.open(folder / "sheet.png").convert("RGB"))
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation/sheet": sheet[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": images, "validation_sheet": [sheet]}, step=step)


def first_batch_sheet(batch: dict[str, Any], path: Path) -> None:
    """One contact sheet of the first batch: target, sources, instruction (what the run really trains on)."""
    from pipeline.common.preview import tensor_to_image

    rows = []
    for i in range(batch["target"].shape[0]):
        pictures = [tensor_to_image(s[i]) for s in batch["sources"]] + [tensor_to_image(batch["target"][i])]
        rows.append((pictures, f"{batch['task']} {batch['keys'][i]} [{batch['variants'][i]}] {batch['texts'][i]}"))
    contact_sheet(rows).save(path)
