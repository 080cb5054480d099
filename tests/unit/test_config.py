"""Flags become typed configs in one place; bad combinations are refused there, naming the flag."""

from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.extract.config import ExtractConfig
from pipeline.shards.tasks import DataConfigError
from pipeline.train.cli import build_parser
from pipeline.train.config import config_from_args
from pipeline.train.config.model import LoraConfig

SPECIFIES = (
    "pipeline.errors",
    "pipeline.extract.cli",
    "pipeline.train.cli",
    "pipeline.train.recipe",
)

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
        # a typo'd number ends in one line, not a traceback deep in the process group or the optimizer
        (["--data_only", "--ddp_timeout", "99999999999999"], UserError, r"--ddp_timeout must be a number in \[1, "),
        (["--data_only", "--learning_rate", "1e38"], UserError, r"--learning_rate must be a number in \[0, 1e\+06\]"),
        (["--data_only", "--image_sample_size", "100000"], UserError, r"--image_sample_size must be .*4096"),
        (["--data_only", "--output_dir", ""], UserError, "--output_dir must be a path, not empty"),
        (["--data_only", "--output_dir", "  "], UserError, "--output_dir must be a path, not empty"),
    ],
)
def test_bad_flags_are_refused_with_the_flag_named(flags, error, message):
    with pytest.raises(error, match=message):
        configure(*flags)


def test_lora_targets_compare_as_a_set_on_resume(tmp_path):
    """``"to_q, to_k"`` after ``"to_q,to_k"`` (spacing, order, a repeat) was refused as a model change."""
    from pipeline.train.recipe import check_resume_recipe, write_recipe

    def recipe(targets: str) -> dict:
        return vars(build_parser().parse_args([*BASE, "--use_peft_lora", "--lora_target_modules", targets]))

    write_recipe(tmp_path, recipe("to_q,to_k"), 0, {})
    for same in ("to_q, to_k", "to_k to_q", "to_k,to_q,to_q"):
        assert check_resume_recipe(tmp_path, recipe(same), 5, False) == {}, same
    with pytest.raises(UserError, match="lora_target_modules"):
        check_resume_recipe(tmp_path, recipe("to_q,to_v"), 5, False)


def test_extraction_refuses_a_flag_in_one_line_before_anything_starts(tmp_path, capfd):
    from pipeline.extract.cli import main

    argv = ["data.jsonl", "--output_dir", str(tmp_path / "o"), "--model_path", "m", "--batch_size", "0"]
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert "--batch_size must be a number >= 1, got 0" in err and "Traceback" not in err
    assert main(["data.jsonl", "--output_dir", "", "--model_path", "m"]) == 2
    assert main(["data.jsonl", "--output_dir", "o", "--model_path", "m", "--ddp_timeout", "99999999999999"]) == 2


def test_reshard_refuses_zero_samples_per_shard(tmp_path, capsys):
    from shards_tools.__main__ import main

    with pytest.raises(SystemExit) as refused:
        main(["reshard", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--max_samples_per_shard", "0"])
    assert refused.value.code == 2
    assert "--max_samples_per_shard: must be a number >= 1, got 0" in capsys.readouterr().err


def test_the_shard_tools_refuse_a_typod_number_in_one_line(tmp_path, capfd):
    """Each subcommand's options check themselves where they are declared (shards_tools/commands.py): before, a
    --limit 0 listed nothing and exited 0, and a --max_failure_ratio of 5 let every sample fail."""
    from shards_tools.__main__ import main
    from shards_tools.convert import ConvertOptions

    assert main(["inspect", str(tmp_path), "--limit", "0"]) == 2
    assert main(["convert-legacy", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--max_failure_ratio", "5"]) == 2
    err = capfd.readouterr().err
    assert (
        "--limit must be a number >= 1, got 0" in err
        and "--max_failure_ratio must be a number in [0, 1], got 5.0" in err
    )
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--max_samples_per_shard must be a number >= 1, got 0"):
        ConvertOptions(max_samples_per_shard=0)  # built in code, checked the same


def test_an_extraction_option_out_of_its_range_names_its_flag():
    """ExtractConfig checks its own fields when built: no config with a typo'd number exists."""
    with pytest.raises(UserError, match="--condition_resolution must be a number in \\[256, 4096\\], got 100"):
        ExtractConfig(jsonl_path="in.jsonl", output_dir="out", model_path="m", condition_resolution=100)
    with pytest.raises(UserError, match="--output_dir must be a path, not empty"):
        ExtractConfig(jsonl_path="in.jsonl", output_dir=" ", model_path="m")
