"""Options are declared once: the parser, the typed configs and the recipe's lists all come from the fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from pipeline.common.options import options_of
from pipeline.train import recipe
from pipeline.train.cli import build_parser
from pipeline.train.config import OPTION_CLASSES, TrainConfig, config_from_args
from pipeline.train.config.data import DataConfig, StreamConfig
from pipeline.train.config.model import FlowConfig, ModelConfig, OptimConfig
from pipeline.train.config.run import CheckpointConfig, TrackingConfig, ValidationConfig

SPECIFIES = (
    "pipeline.train.config.data",
    "pipeline.train.config.model",
    "pipeline.train.config.run",
)

# fields that are not flags: nested configs, values derived from other flags, and internal settings
NOT_FLAGS = {
    (TrainConfig, "data"), (TrainConfig, "stream"), (TrainConfig, "checkpoint"), (TrainConfig, "flow"),
    (TrainConfig, "optim"), (TrainConfig, "model"), (TrainConfig, "tracking"), (TrainConfig, "validation"),
    (TrainConfig, "recipe"), (TrainConfig, "allow_recipe_change"), (ModelConfig, "lora"),
    (StreamConfig, "online_prompts"), (FlowConfig, "seed"), (ValidationConfig, "seed"),
    (TrackingConfig, "loss_window"),
}  # fmt: skip


def _parser_flags() -> dict[str, object]:
    """dest → action of every flag but --help, --config and the switches that set another flag's value."""
    return {
        a.dest: a
        for a in build_parser()._actions
        if a.option_strings and a.dest not in ("help", "config") and type(a) is not argparse._StoreConstAction
    }


def test_every_flag_is_one_config_field_and_every_field_a_flag_or_declared_derived():
    fields = [(cls, f) for cls in OPTION_CLASSES for f in dataclasses.fields(cls)]
    declared = [spec.name(f) for cls in OPTION_CLASSES for f, spec in options_of(cls)]
    assert len(declared) == len(set(declared)), "a flag declared by two fields"
    assert set(_parser_flags()) == set(declared)
    undeclared = {(cls, f.name) for cls, f in fields if "option" not in f.metadata}
    assert undeclared == NOT_FLAGS


def test_parsed_defaults_are_the_config_defaults():
    """One default per option: a run given no optional flag gets exactly what building a config directly gives
    (FlowConfig.vae_mini_batch was 1 built directly and 32 from the command line)."""
    argv = ["--pretrained_model_name_or_path", "m", "--train_data_meta_dir", "d", "--max_train_steps", "1"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config.flow == FlowConfig()
    assert config.optim == OptimConfig()
    assert config.tracking == TrackingConfig()
    assert config.checkpoint == CheckpointConfig()
    assert config.stream == dataclasses.replace(StreamConfig(), storage_options={})
    assert config.data == dataclasses.replace(DataConfig(), meta_dir="d")
    assert config.model == ModelConfig(pretrained="m")
    for derived, source in [(FlowConfig.seed, StreamConfig.seed), (ValidationConfig.seed, StreamConfig.seed)]:
        assert derived == source


@pytest.mark.parametrize(
    "name, listed",
    [
        (
            "RUN_ONLY",  # as the hand-kept list had it: the derivation changes no resume behaviour
            {
                "config", "resume_from_checkpoint", "export_checkpoint", "max_train_steps", "checkpointing_steps",
                "checkpoints_total_limit", "data_trace", "report_to", "logging_dir", "tracker_project_name",
                "report_model_info", "dataloader_num_workers", "prefetch_factor", "local_rank", "nnodes",
                "num_processes_per_node", "streaming", "num_train_epochs", "allow_recipe_change", "plan",
                "plan_gpu_memory", "plan_processes", "plan_num_sources", "plan_text_tokens",
                "max_bad_in_a_row",  # added since: one field in StreamConfig, its scope says "not compared"
                "overwrite_output_dir",  # added since: how this launch treats the folder
                "ddp_timeout",  # added since: how long this launch's ranks wait for each other
            },
        ),
        (
            "MODEL_FLAGS",
            {
                "pretrained_model_name_or_path", "transformer_path", "vae_path", "use_peft_lora", "lora_r",
                "lora_alpha", "lora_target_modules", "trainable_modules", "trainable_modules_low_learning_rate",
                "condition_encoder_mode", "prompt_style",
            },
        ),
    ],
)  # fmt: skip
def test_the_recipe_lists_are_derived_from_the_scopes(name, listed):
    assert getattr(recipe, name) == listed
    assert getattr(recipe, name) <= set(_parser_flags()) | {"config"}


def test_an_option_field_is_the_flag_and_the_config_value():
    """A field declared once reaches --help, the parsed Namespace and the config (with its conversion)."""
    parser = build_parser()
    help_text = parser.format_help()
    assert "--pool_mb" in help_text and "--lora_rank" in help_text and "--num_workers" in help_text
    args = parser.parse_args(
        [
            "--data_only",
            "--train_data_meta_dir",
            "d",
            "--max_train_steps",
            "1",
            "--pool_mb",
            "1.5",
            "--num_workers",
            "3",
        ]
    )
    config = config_from_args(args)
    assert config.stream.pool_bytes == int(1.5 * (1 << 20)) and config.data.num_workers == 3


def test_extraction_takes_a_typed_config_derived_from_the_same_declarations():
    """Nothing below the extraction CLI reads a Namespace; the crop scale has its own name, the original spelling
    still accepted."""
    from pipeline.extract.cli import build_parser as extract_parser
    from pipeline.extract.cli import config_from_argv
    from pipeline.extract.config import ExtractConfig

    config = config_from_argv(["in.jsonl", "--output_dir", "o", "--model_path", "m"])
    assert config == ExtractConfig(jsonl_path="in.jsonl", output_dir="o", model_path="m")
    assert config_from_argv(["in.jsonl", "--output_dir", "o", "--model_path", "m", "--image_sample_size", "768"]) == (
        dataclasses.replace(config, crop_scale=768)
    )
    flags = {a.dest for a in extract_parser()._actions if a.dest != "help"}
    assert flags == {f.name for f in dataclasses.fields(ExtractConfig)}


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
        (["--learning_rate=-1e-4"], "--learning_rate must be a number in [0, 1e+06]"),
        (["--adam_beta1", "1"], "--adam_beta1 must be a number in [0, 1)"),
        (["--adam_beta2", "-0.1"], "--adam_beta2"),
        (["--adam_epsilon", "0"], "--adam_epsilon must be a number > 0"),
        (["--adam_weight_decay", "-1"], "--adam_weight_decay"),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number"),
        (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be a number >= 1"),
        (["--checkpointing_steps", "0"], "--checkpointing_steps"),
        (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps"),
        (["--lora_dropout", "1"], "--lora_dropout"),
        (["--text_drop_ratio", "nan"], "--text_drop_ratio"),
    ],
)
def test_every_numeric_option_is_checked_where_it_is_declared(flags, named):
    from pipeline.errors import UserError
    from pipeline.train.cli import build_parser
    from pipeline.train.config import config_from_args

    base = ["--pretrained_model_name_or_path", "m", "--train_data_meta_dir", "x", "--output_dir", "o"]
    base += ["--max_train_steps", "1", "--use_peft_lora"]  # configs are built, nothing is loaded
    with pytest.raises(UserError) as refused:
        config_from_args(build_parser().parse_args(base + flags))
    assert named in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--lora_r", "8", "--lora_rank", "4"],
        ["--parallelism", "ddp", "--use_fsdp"],
        ["--num_workers", "2", "--dataloader_num_workers=3"],
    ],
)
def test_one_option_under_two_names_with_different_values_is_refused(argv):
    from pipeline.errors import UserError
    from pipeline.train.cli import build_parser
    from pipeline.train.recipe import parse_with_recipe

    with pytest.raises(UserError, match="two names") as refused:
        parse_with_recipe(build_parser(), argv)
    assert argv[0] in str(refused.value)
    parse_with_recipe(build_parser(), ["--lora_r", "8", "--lora_rank", "8"])  # the same value twice is no conflict


@pytest.mark.parametrize("recipe", ["lora_r: 8\nlora_rank: 4\n", "num_workers: 1\ndataloader_num_workers: 2\n"])
def test_a_recipe_naming_one_option_twice_is_refused_and_the_command_line_still_overrides(tmp_path, recipe):
    from pipeline.train.cli import build_parser
    from pipeline.train.recipe import RecipeError, parse_with_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    with pytest.raises(RecipeError, match="two names"):
        parse_with_recipe(build_parser(), ["--config", str(path)])
    path.write_text("lora_rank: 4\n")
    assert parse_with_recipe(build_parser(), ["--config", str(path), "--lora_r", "8"]).lora_r == 8
