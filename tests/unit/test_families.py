"""``pipeline/families/``: the model lives behind one seam. No module outside it names a model class; the family
is detected from the model folder (or a ``--plan`` name), recorded in what extraction writes, and checked where
shards meet a model; unknown classes, families and format versions are refused in one line."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from pipeline import families
from pipeline.errors import UserError

SPECIFIES = ("pipeline.families.base",)

ROOT = Path(__file__).resolve().parents[2]
# what names a model class: diffusers pipelines, transformers, VAEs and schedulers; transformers' text encoders,
# processors and tokenizers
MODEL_CLASS_SUFFIXES = (
    "Pipeline", "Transformer2DModel", "ForConditionalGeneration", "Processor", "Tokenizer", "Scheduler",
)  # fmt: skip
MODEL_CLASS_PREFIXES = ("AutoencoderKL", "AutoTokenizer", "AutoProcessor", "AutoModel")


def names_a_model_class(name: str) -> bool:
    return name.endswith(MODEL_CLASS_SUFFIXES) or name.startswith(MODEL_CLASS_PREFIXES)


def model_classes_named(path: Path) -> list[str]:
    """Model classes a module imports from diffusers or transformers, or reaches as their attributes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("diffusers", "transformers"):
            found += [a.name for a in node.names if names_a_model_class(a.name)]
        elif isinstance(node, ast.Attribute) and names_a_model_class(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in ("diffusers", "transformers"):
                found.append(node.attr)
    return found


def test_no_module_outside_the_families_names_a_model_class():
    outside = [
        f for package in ("pipeline", "shards_tools", "benchmarks") for f in (ROOT / package).rglob("*.py")
        if "families" not in f.relative_to(ROOT).parts
    ]  # fmt: skip
    named = {str(f.relative_to(ROOT)): model_classes_named(f) for f in outside}
    assert {k: v for k, v in named.items() if v} == {}


def test_the_checker_sees_imports_and_attributes(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from diffusers import QwenImageTransformer2DModel, load_image\n"
        "    import transformers\n    return transformers.Qwen2_5_VLForConditionalGeneration\n"
    )
    assert model_classes_named(source) == ["QwenImageTransformer2DModel", "Qwen2_5_VLForConditionalGeneration"]


def test_the_family_is_detected_from_the_model_folder_and_plan_names(tiny_model_dir, tmp_path):
    assert families.detect(str(tiny_model_dir)).name == "qwen_edit"
    assert families.detect(str(tiny_model_dir / "transformer")).name == "qwen_edit", "a transformer folder"
    assert families.detect("qwen-image-edit-2511").name == "qwen_edit"
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    with pytest.raises(UserError) as refused:
        families.detect(str(other))
    message = str(refused.value)
    assert "'FluxKontextPipeline' is not a supported model" in message and "QwenImageEditPlusPipeline" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="no model_index.json"):
        families.detect(str(tmp_path))


def test_a_transformer_path_of_another_family_is_refused(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir / "transformer", tmp_path / "transformer")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "QwenImage21Transformer2DModel"}))
    with pytest.raises(UserError, match="a QwenImage21Transformer2DModel, not a transformer of the model's family"):
        families.check_transformer_folder(families.get("qwen_edit"), str(folder))
    families.check_transformer_folder(families.get("qwen_edit"), str(tiny_model_dir / "transformer"))


def test_an_unknown_family_name_is_refused_naming_the_known_ones():
    assert families.get(None).name == "qwen_edit", "a manifest without a family"
    with pytest.raises(UserError, match="unknown model family 'qwen_image99'; this version knows qwen_edit"):
        families.get("qwen_image99")


def test_every_family_provides_the_whole_interface():
    import inspect

    from pipeline.families.base import ModelFamily

    # what a family must provide: every method whose base version says it is missing (the others have defaults)
    required = [
        n for n, v in vars(ModelFamily).items()
        if callable(v) and not n.startswith("_") and "self._missing(" in inspect.getsource(v)
    ]  # fmt: skip
    core = {"prompt_builder", "prompt_encoder", "stored_embedding", "prompt_from_sample", "pack_latents", "predict",
            "text_positions", "validation_renderer", "block_inputs", "make_tiny_model"}  # fmt: skip
    assert core <= set(required), required
    for family in families.FAMILIES.values():
        missing = [n for n in required if getattr(type(family), n) is getattr(ModelFamily, n)]
        assert missing == [], f"{family.name} lacks {missing}"
        assert family.name and family.pipeline_classes and family.transformer_classes and family.default_lora_targets
        assert family.vae_class_name and family.lora_pipeline_class and family.comfyui_prefix
        assert family.transformer_class().__name__ == family.transformer_classes[0]
        assert set(family.lora_files) == {"diffusers", "comfyui"} and family.prompt_styles


def test_a_manifest_of_an_unknown_format_version_is_refused_by_every_reader(tmp_path):
    from helpers import synthetic_task

    from pipeline.shards.tasks import DataConfigError, discover_tasks
    from shards_tools.verify import verify

    task = synthetic_task(tmp_path, "t", samples=4, per_shard=4)
    manifest = json.loads((task / "manifest.json").read_text())
    assert manifest["family"] == "qwen_edit" and manifest["format_version"] == 1
    (task / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(DataConfigError, match="shard format version 3, which this version does not read"):
        discover_tasks(str(tmp_path), None)
    _, problems = verify(str(task), None)
    assert len(problems) == 1 and "shard format version 3" in problems[0]["problem"]


def test_a_manifest_without_a_family_is_qwen_edit_and_tasks_of_two_families_are_refused(tmp_path):
    from helpers import synthetic_task

    from pipeline.shards.tasks import DataConfigError, discover_tasks
    from pipeline.train.config.data import DataConfig
    from pipeline.train.stream.startup import check_conditioning, check_family

    for name in ("old", "other"):
        synthetic_task(tmp_path, name, samples=4, per_shard=4)
    old = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del old["family"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(old))
    other = json.loads((tmp_path / "other" / "manifest.json").read_text())
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({**other, "family": "qwen_image21"}))
    tasks = discover_tasks(str(tmp_path), None)
    assert tasks["old"].family == "qwen_edit" and tasks["other"].family == "qwen_image21"
    with pytest.raises(DataConfigError, match="another model family than the model's \\(qwen_edit\\): other: qwen_im"):
        check_family(tasks, DataConfig(meta_dir=str(tmp_path)), "qwen_edit")
    check_family(tasks, DataConfig(meta_dir=str(tmp_path), task_weights={"old": 1.0}), "qwen_edit")
    with pytest.raises(DataConfigError, match="different model families"):
        check_conditioning(tasks, allow_mixed=True)


def test_an_extraction_resume_compares_the_family_and_an_older_identity_is_qwen_edits(tmp_path):
    from pipeline.shards.commits import IDENTITY, check_identity
    from pipeline.shards.storage import Store

    store = Store(str(tmp_path))
    store.write_json(IDENTITY, {"input": "a.jsonl"})  # written before families were recorded
    check_identity(store, {"input": "a.jsonl", "family": "qwen_edit"}, "")
    with pytest.raises(UserError, match="family: 'qwen_edit' then, 'qwen_image21' now"):
        check_identity(store, {"input": "a.jsonl", "family": "qwen_image21"}, "")


def test_lora_targets_default_to_the_familys_and_one_matching_no_module_is_refused(tiny_model_dir):
    from pipeline.train.cli import build_parser
    from pipeline.train.config import config_from_args
    from pipeline.train.engine.model import add_lora, load_transformer

    base = ["--train_data_meta_dir", "m", "--output_dir", "o", "--max_train_steps", "1", "--use_peft_lora"]
    config = config_from_args(
        build_parser().parse_args([*base, "--pretrained_model_name_or_path", str(tiny_model_dir)])
    )
    family = families.get("qwen_edit")
    assert config.model.lora.target_modules == family.default_lora_targets
    assert config.recipe["lora_target_modules"] == ",".join(family.default_lora_targets), "config.yaml as before"
    transformer = load_transformer(str(tiny_model_dir))
    with pytest.raises(UserError, match="--lora_target_modules to_qq,img_mlp.net.9: no module of the transformer"):
        add_lora(transformer, 4, 4.0, 0.0, ["to_q", "to_qq", "img_mlp.net.9"], None)
    params, _ = add_lora(transformer, 4, 4.0, 0.0, ["to_q", "attn.to_k"], None)
    assert params, "names and endings after a dot match, as PEFT matches them"
