"""Flags become typed configs in one place; bad combinations are refused there, naming the flag."""

from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.shards.tasks import DataConfigError
from pipeline.train.cli import build_parser
from pipeline.train.config import LoraConfig, config_from_args

BASE = ["--train_data_meta_dir", "meta", "--output_dir", "out", "--max_train_steps", "10"]


def configure(*flags: str):
    return config_from_args(build_parser().parse_args([*BASE, *flags]))


def test_flags_land_in_their_component():
    config = configure(
        "--pretrained_model_name_or_path",
        "model",
        "--use_peft_lora",
        "--lora_rank",
        "8",
        "--lora_alpha",
        "4",
        "--lora_target_modules",
        "to_q, to_k",
        "--train_sampling_steps",
        "500",
        "--seed",
        "7",
        "--train_data_weights",
        "a=2,b=1",
        "--condition_encoder_mode",
        "sync",
    )
    assert config.model.lora == LoraConfig(rank=8, alpha=4.0, dropout=0.0, target_modules=("to_q", "to_k"))
    assert config.flow.sampling_steps == 500 and config.flow.seed == 7 and config.stream.seed == 7
    assert config.data.task_weights == {"a": 2.0, "b": 1.0}
    assert config.stream.online_prompts and config.checkpoint.output_dir == "out"
    assert config.scalars()["flow.sampling_steps"] == 500


def test_data_only_needs_no_model():
    assert configure("--data_only").model is None


@pytest.mark.parametrize(
    "flags, error, message",
    [
        ([], DataConfigError, "--pretrained_model_name_or_path is required"),
        (["--data_only", "--train_batch_size", "0"], UserError, "--train_batch_size must be a number >= 1, got 0"),
        (["--data_only", "--text_drop_ratio", "1.5"], UserError, "--text_drop_ratio"),
        (["--data_only", "--train_src_img_num_weights", "1=x"], UserError, "--train_src_img_num_weights"),
        (["--data_only", "--storage_options", "{nope"], UserError, "--storage_options is not valid JSON"),
    ],
)
def test_bad_flags_are_refused_with_the_flag_named(flags, error, message):
    with pytest.raises(error, match=message):
        configure(*flags)
