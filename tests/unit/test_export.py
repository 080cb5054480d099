"""pipeline/train/engine/export.py: the trained transformer in the files diffusers loads, from the main process."""

from __future__ import annotations

import torch

from pipeline.families import get
from pipeline.train.engine.export import export_weights


def test_a_full_fine_tune_exports_a_transformer_diffusers_loads_and_only_the_main_process_writes(
    tiny_model_dir, tmp_path
):
    family = get("qwen_edit")
    transformer = family.transformer_class().from_pretrained(tiny_model_dir, subfolder="transformer")
    with torch.no_grad():
        next(transformer.parameters()).add_(1.0)  # "trained"
    assert export_weights(transformer, None, tmp_path / "other", None, is_main=False, family=family) == {}
    assert not (tmp_path / "other").exists()
    outputs = export_weights(transformer, None, tmp_path / "out", None, is_main=True, family=family)
    loaded = family.transformer_class().from_pretrained(outputs["transformer"])
    for (name, mine), theirs in zip(transformer.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name
