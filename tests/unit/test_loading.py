"""``engine/loading.py``: the trainer starts from exactly the tensors ``from_pretrained`` would load from the same
folder — the files the index names, never a stale download or a variant beside them — and refuses weights that
hold tensors the model does not have (or lacks some) in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError
from pipeline.train.config.model import ModelConfig
from pipeline.train.engine import loading
from pipeline.train.engine.model import build_training_models


def model_with_transformer(tiny_model_dir: Path, root: Path) -> Path:
    """A model folder whose other parts link to the tiny model's and whose transformer folder is a copy to edit."""
    root.mkdir()
    for child in tiny_model_dir.iterdir():
        if child.name != "transformer":
            (root / child.name).symlink_to(child)
    shutil.copytree(tiny_model_dir / "transformer", root / "transformer")
    return root


def sharded(tiny_model_dir: Path, root: Path) -> Path:
    """The transformer saved as diffusers saves a large one: shards and their index."""
    from diffusers import QwenImageTransformer2DModel

    model = model_with_transformer(tiny_model_dir, root)
    shutil.rmtree(model / "transformer")
    reference = QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    reference.save_pretrained(model / "transformer", max_shard_size="40KB")
    assert (model / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return model


def other_values(path: Path) -> dict[str, torch.Tensor]:
    """The same names and shapes with other values (another download of the same layout)."""
    generator = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in load_file(path).items()}


def loaded(model: Path) -> dict[str, torch.Tensor]:
    built = build_training_models(ModelConfig(pretrained=str(model)), None, 1e-4)
    return {n: p.detach() for n, p in built.transformer.named_parameters()}


def diffusers_loads(model: Path) -> dict[str, torch.Tensor]:
    from diffusers import QwenImageTransformer2DModel

    reference = QwenImageTransformer2DModel.from_pretrained(model / "transformer")
    return {n: p.detach() for n, p in reference.named_parameters()}


@pytest.mark.parametrize("stray", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"])
def test_an_indexed_folder_loads_the_files_its_index_names_and_nothing_beside_them(tiny_model_dir, tmp_path, stray):
    model = sharded(tiny_model_dir, tmp_path / "model")
    single = model_with_transformer(tiny_model_dir, tmp_path / "single")
    save_file(other_values(single / "transformer" / "diffusion_pytorch_model.safetensors"),
              model / "transformer" / stray)  # fmt: skip
    expected, got = diffusers_loads(model), loaded(model)
    assert got.keys() == expected.keys()
    differ = [n for n in got if not torch.equal(got[n], expected[n])]
    assert not differ, f"{len(differ)} of {len(got)} tensors differ from what diffusers loads, e.g. {differ[:3]}"


def test_a_single_file_folder_ignores_a_variant_beside_it(tiny_model_dir, tmp_path):
    model = model_with_transformer(tiny_model_dir, tmp_path / "model")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file(other_values(weights), model / "transformer" / "diffusion_pytorch_model.fp16.safetensors")
    save_file(other_values(weights), model / "transformer" / "zzz-stale.safetensors")
    expected, got = diffusers_loads(model), loaded(model)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_an_index_that_lies_or_a_folder_without_the_diffusers_file_is_refused_in_one_line(tiny_model_dir, tmp_path):
    model = sharded(tiny_model_dir, tmp_path / "model")
    index = model / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = sorted(content["weight_map"])[0]
    elsewhere = sorted(set(content["weight_map"].values()) - {content["weight_map"][first]})[0]
    content["weight_map"][first] = elsewhere  # a file that exists and does not hold it
    index.write_text(json.dumps(content))
    with pytest.raises(UserError, match="index.json names 1 tensor"):
        loaded(model)
    renamed = model_with_transformer(tiny_model_dir, tmp_path / "renamed")
    folder = renamed / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "weights.safetensors")
    with pytest.raises(UserError, match="neither diffusion_pytorch_model.safetensors nor"):
        loaded(renamed)


def scaled_fp8(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An fp8 checkpoint as ComfyUI-style tools write it: fp8 weights and a ``weight_scale`` beside each."""
    out = {}
    for name, tensor in values.items():
        if name.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.abs().max().clamp(min=1e-12) / 448
            out[name] = (tensor / scale).to(torch.float8_e4m3fn)
            out[name.removesuffix("weight") + "weight_scale"] = scale.reshape(())
        else:
            out[name] = tensor
    return out


def test_tensors_the_model_does_not_have_are_refused_in_the_folder_as_in_a_file(tiny_model_dir, tmp_path):
    model = model_with_transformer(tiny_model_dir, tmp_path / "model")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    fp8 = scaled_fp8(load_file(weights))
    save_file(fp8, weights)
    with pytest.raises(UserError, match=r"tensor\(s\) the transformer does not have.*weight_scale.*fp8"):
        loaded(model)
    save_file(fp8, tmp_path / "fp8.safetensors")
    config = ModelConfig(pretrained=str(tiny_model_dir), transformer_path=str(tmp_path / "fp8.safetensors"))
    with pytest.raises(UserError, match="key.* the transformer does not have.*weight_scale"):
        build_training_models(config, None, 1e-4)


def test_a_folder_missing_tensors_is_refused_naming_them(tiny_model_dir, tmp_path):
    model = model_with_transformer(tiny_model_dir, tmp_path / "model")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    values = load_file(weights)
    dropped = sorted(values)[0]
    del values[dropped]
    save_file(values, weights)
    with pytest.raises(UserError, match=f"1 tensor\\(s\\) of the transformer missing, e.g. \\['{dropped}'\\]"):
        loaded(model)


def test_a_folder_with_one_weights_file_maps_every_tensor_to_it(tiny_model_dir):
    folder = tiny_model_dir / "transformer"
    files = loading.folder_weight_files(folder)
    assert set(files.values()) == {folder / "diffusion_pytorch_model.safetensors"}
    assert set(files) == set(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
