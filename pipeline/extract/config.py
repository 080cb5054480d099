"""Typed extraction configuration: every ``python -m pipeline.extract`` option, declared once as a field.

The CLI's parser is derived from :class:`ExtractConfig` (``pipeline/common/options.py``)
and the :class:`~pipeline.extract.extractor.Extractor` takes the config, never the
parsed Namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.common import images as imaging
from pipeline.common.flags import (
    DEFAULT_MAX_FAILURE_RATIO,
    DEFAULT_SHARD_SAMPLES,
    EXTRACT_DDP_TIMEOUT,
    MAX_DDP_TIMEOUT,
    MAX_FAILURE_RATIO_HELP,
    NO_TRAIN_COPIES,
    STORAGE_OPTIONS_HELP,
    ddp_timeout_help,
    shard_size_help,
    train_copy_size_help,
)
from pipeline.common.options import Checked, at_least, between, greater_than, non_empty, option
from pipeline.common.records import DEFAULT_MAX_ROW_BYTES
from pipeline.families import PROMPT_STYLES, prompt_style_help


@dataclass(frozen=True)
class ExtractConfig(Checked):
    """One extraction run: input, model, the prompts' form, the shards, and the limits on hostile input."""

    jsonl_path: str | None = option(
        None, "input JSONL (local path or fsspec URL), one sample per line", positional=True
    )
    output_dir: str | None = option(
        None, "task directory to write: local path, s3://, gs://, ...", required=True, check=non_empty
    )
    model_path: str | None = option(
        None,
        "the model's diffusers folder (model_index.json, text_encoder/, …): Qwen-Image-Edit-2509/2511, FireRed-Image-"
        "Edit 1.x, or Qwen-Image 2.1; its family decides how prompts are encoded and what a sample stores",
        required=True,
    )
    batch_size: int = option(4, "prompts per encoder forward (a sample has 1-6)", check=at_least(1))
    crop_scale: int = option(
        512,
        "scale of the --prompt_style firered crop table; images are stored at original resolution and cropped at "
        "training time. --image_sample_size is the original tool's name for it (same default)",
        aliases=("image_sample_size",),
    )
    condition_resolution: int = option(
        1024,
        "Qwen-Image 2.1: each condition image is resized once to this² area at its aspect (sides ×32), the pixels "
        "both the text encoder and, in training, the VAE see (diffusers' output_resolution); other families ignore it",
        check=between(256, 4096),
    )
    train_copy_size: int = option(NO_TRAIN_COPIES, train_copy_size_help())
    num_workers: int = option(
        2, "DataLoader workers loading and preprocessing images", aliases=("dataloader_num_workers",)
    )
    prefetch_factor: int = option(4, "samples each worker prepares ahead")
    disable_inverse: bool = option(False, "do not store inverse-instruction embeddings")
    t2i_mode: bool = option(
        False,
        "text-to-image data: every sample is encoded with the T2I template, source images are ignored; "
        "implies --disable_inverse",
    )
    prompt_style: str = option(PROMPT_STYLES[0], prompt_style_help(), choices=tuple(PROMPT_STYLES))
    batching: str = option(
        "padded",
        "padded (default): prompts of similar length (64-token buckets) share a forward, padded with a "
        "mask: full batches, embeddings equal a one-prompt forward up to float rounding (a few bf16 ulps); "
        "exact: only prompts of equal token length share a forward, no padding, so on CPU every embedding is "
        "bit-identical to diffusers' encode_prompt (a CPU promise: cuBLAS does not guarantee bit-equality "
        "across batch shapes); batches are often half full",
        choices=("padded", "exact"),
    )
    max_samples_per_shard: int = option(
        DEFAULT_SHARD_SAMPLES, shard_size_help(DEFAULT_SHARD_SAMPLES), check=at_least(1)
    )
    max_shard_bytes: int = option(1 << 30, "start a new shard after this many bytes", check=at_least(1))
    max_failure_ratio: float = option(DEFAULT_MAX_FAILURE_RATIO, MAX_FAILURE_RATIO_HELP, check=between(0, 1))
    max_image_pixels: int = option(
        imaging.DEFAULT_MAX_PIXELS,
        "reject images with more pixels (decompression bombs); may exceed PIL's own limit (default: PIL's)",
    )
    max_image_bytes: int = option(
        imaging.DEFAULT_MAX_BYTES,
        "reject image files larger than this, checked before and while reading (default 64 MiB)",
    )
    max_sequence_length: int = option(
        1024,
        "a prompt whose embedding is longer than this many tokens (the instruction with the system prompt and the "
        "source images' vision tokens) goes to the failures file as prompt_too_long, whole: truncating it would "
        "cut the instruction, which comes last. Default: the diffusers pipeline's cap",
        check=at_least(1),
    )
    max_row_bytes: int = option(
        DEFAULT_MAX_ROW_BYTES,
        "a JSONL row longer than this (bytes) goes to the failures file as row_too_large, read through without "
        "being held (default 1 MiB); fields the format does not use are kept in the sample up to 4 KiB each",
        check=at_least(1024),
    )
    fetch_timeout: float = option(
        imaging.DEFAULT_FETCH_TIMEOUT,
        "seconds to connect to and wait for data from http(s) and S3 image URLs (default 60)",
        check=greater_than(0),
    )
    source_column: str = option("source_image", "JSONL field with the source image(s)")
    target_column: str = option("target_image", "JSONL field with the target image")
    storage_options: str | None = option(None, STORAGE_OPTIONS_HELP)
    ddp_timeout: int = option(
        EXTRACT_DDP_TIMEOUT,
        ddp_timeout_help(EXTRACT_DDP_TIMEOUT, "24 hours, as the ranks' shares of the input may end hours apart"),
        check=between(1, MAX_DDP_TIMEOUT),
    )
    skip_embeddings: bool = option(False, "write image-only shards (online encoding)")
    device: str = option("auto", "auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda:N")
    dtype: str = option(
        "auto",
        "encoder compute dtype; auto = bfloat16 on CUDA, float32 on CPU (embeddings are stored as bfloat16)",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    tmp_dir: str | None = option(None, "local folder for shards being assembled (default: system temp)")
    queue_size: int = option(32, "finished samples buffered for the shard writer")
