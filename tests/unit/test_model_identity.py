"""``recipe.content_identity``: a resume is refused when other weights of the same layout stand behind the model
path (FireRed-Image-Edit in place of Qwen-Image-Edit-2509, a newer revision), and allowed when the same weights are
reached by another path or a symlink, or when the run was started by a version that recorded the layout alone."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

from pipeline.train.cli import build_parser
from pipeline.train.recipe import (
    MODEL_IDENTITY,
    SAMPLED,
    RecipeError,
    check_resume_recipe,
    content_identity,
    with_model_identity,
    write_recipe,
)


def weights(seed: int) -> dict[str, torch.Tensor]:
    """The same names, dtypes and shapes for every seed (so the same safetensors header and file size); the first
    1.5 MiB of data is the same too, so a digest of the first MiB cannot tell two seeds apart."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.arange(384 * 1024, dtype=torch.float32).reshape(384, 1024),
        "b.weight": torch.randn(512, 1024, generator=generator),
    }


def model_folder(root, seed: int):
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "QwenImageEditPlusPipeline"}')
    (root / "transformer" / "config.json").write_text('{"num_layers": 1}')
    save_file(weights(seed), root / "transformer" / "diffusion_pytorch_model.safetensors")
    return root


def recipe_for(path) -> dict:
    flags = vars(build_parser().parse_args(["--pretrained_model_name_or_path", str(path)]))
    return with_model_identity(flags)


def test_other_weights_of_the_same_layout_are_another_model(tmp_path):
    base, other = model_folder(tmp_path / "base", 0), model_folder(tmp_path / "other", 1)
    file = "transformer/diffusion_pytorch_model.safetensors"
    assert (base / file).stat().st_size == (other / file).stat().st_size
    assert (base / file).read_bytes()[: 1 << 20] == (other / file).read_bytes()[: 1 << 20]
    assert content_identity(str(base)) != content_identity(str(other))
    assert content_identity(str(base / file)) != content_identity(str(other / file)), "a --transformer_path file"
    run = tmp_path / "run"
    write_recipe(run, recipe_for(base), 0, {})
    shutil.rmtree(base)
    shutil.copytree(other, base)  # a re-download of another model into the same path
    with pytest.raises(RecipeError, match="model_identity"):
        check_resume_recipe(run, recipe_for(base), 10, False)


def test_the_same_weights_by_another_path_or_a_symlink_are_the_same_model(tmp_path):
    base = model_folder(tmp_path / "base", 0)
    copy = shutil.copytree(base, tmp_path / "elsewhere" / "copy")
    (tmp_path / "link").symlink_to(base)
    run = tmp_path / "run"
    write_recipe(run, recipe_for(base), 0, {})
    for path in (copy, tmp_path / "link", f"{tmp_path}/./base/"):
        assert check_resume_recipe(run, recipe_for(path), 10, False) == {}, path


def test_a_run_started_by_an_older_version_resumes_on_the_layout_it_recorded(tmp_path):
    base, other = model_folder(tmp_path / "base", 0), model_folder(tmp_path / "other", 1)
    run = tmp_path / "run"
    old = recipe_for(base)
    old[MODEL_IDENTITY] = {k: v.split(SAMPLED)[0] if v else v for k, v in old[MODEL_IDENTITY].items()}
    write_recipe(run, old, 0, {})
    assert (
        SAMPLED
        not in yaml.safe_load((run / "config.yaml").read_text())[MODEL_IDENTITY]["pretrained_model_name_or_path"]
    )
    assert check_resume_recipe(run, recipe_for(base), 10, False) == {}
    (other / "transformer" / "config.json").write_text('{"num_layers": 2}')  # a layout change is still seen
    with pytest.raises(RecipeError, match="model_identity"):
        check_resume_recipe(run, recipe_for(other), 10, False)
