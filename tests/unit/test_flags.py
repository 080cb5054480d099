"""pipeline/common/flags.py and pipeline/common/variants.py: the shared flags' rules, and which variants a sample
gets."""

from __future__ import annotations

import argparse

import pytest

from pipeline.common.flags import positive_int, require_model_folder
from pipeline.common.variants import plan_variants
from pipeline.errors import UserError

SPECIFIES = ("pipeline.common.variants",)


def test_a_count_flag_refuses_zero_and_words_in_the_usage_line():
    assert positive_int("3") == 3
    for text, said in (("0", "must be a number >= 1, got 0"), ("x", "'x' is not a whole number")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            positive_int(text)
    from shards_tools.__main__ import build_parser

    with pytest.raises(SystemExit):  # reshard's shard size has no default: required
        build_parser().parse_args(["reshard", "task", "--output_dir", "out"])
    assert build_parser().parse_args(["reshard", "task", "--output_dir", "out", "--max_samples_per_shard", "3"])


def test_a_model_given_as_a_folder_must_be_one(tmp_path):
    (tmp_path / "file").write_text("x")
    require_model_folder(str(tmp_path), "--model_path")
    require_model_folder("org/name", "--model_path")  # a Hub id: the loaders decide
    with pytest.raises(UserError, match="is a file"):
        require_model_folder(str(tmp_path / "file"), "--model_path")
    with pytest.raises(UserError, match="no such folder"):
        require_model_folder(str(tmp_path / "missing"), "--model_path")


def test_an_edit_with_one_source_gets_the_inverse_variants_and_a_text_to_image_sample_no_drop():
    texts = {"instruction_en": "add a hat", "instruction_cn": "", "inverse_en": "remove the hat", "inverse_cn": ""}
    texts = {key: texts.get(key, "") for key in texts}
    from pipeline.shards.format import VARIANT_TEXT

    texts = {VARIANT_TEXT[v]: t for v, t in zip(("en", "cn", "en_inv", "cn_inv"), texts.values(), strict=True)}
    edit = [(v, images) for v, images, _ in plan_variants(texts, 1, inverse=True)]
    assert edit == [("en", "sources"), ("drop", "sources"), ("en_inv", "target"), ("drop_inv", "target")]
    assert [v for v, _, _ in plan_variants(texts, 2, inverse=True)] == ["en", "drop"]  # inverse: one source only
    assert [(v, i) for v, i, _ in plan_variants(texts, 0, inverse=True)] == [("en", "none")]
