"""What fine-tuning users expect: the original tool's flags and clipping, LoRA files at the trained strength,
per-task loss, recipe files, readable captions (fast tests; the full run is in test_train.py)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.train.cli import build_parser
from pipeline.train.config import config_from_args
from pipeline.train.recipe import RecipeError, check_resume_recipe, parse_with_recipe, write_recipe

SPECIFIES = (
    "pipeline.common.preview",
    "pipeline.train.engine.clipping",
    "pipeline.train.engine.metrics",
    "pipeline.train.engine.model",
)

# --- the original tool's defaults --------------------------------------------------------------------

# the original's argument parser (its documented defaults), flag -> default
ORIGINAL_DEFAULTS = {
    "train_src_img_num_weights": "0=0,1=10,2=0,3=0",
    "learning_rate": 1e-4,
    "lr_warmup_steps": 500,
    "lr_scheduler": "constant",
    "train_batch_size": 16,
    "lora_r": 32,
    "lora_alpha": 32,
    "dataloader_num_workers": 0,
    "prefetch_factor": 2,
    "max_grad_norm": 1.0,
    "initial_grad_norm_ratio": 5,
    "abnormal_norm_clip_start": 1000,
    "checkpointing_steps": 500,
    "image_sample_size": 512,
    "vae_mini_batch": 32,
    "logging_dir": "logs",
    "tracker_project_name": "rededit-finetune",
    "output_dir": "model-finetuned",
    "adam_weight_decay": 1e-2,
    "adam_epsilon": 1e-8,
    "train_sampling_steps": 1000,
    "weighting_scheme": "none",
    "mode_scale": 1.29,
}


def test_defaults_are_the_original_tools():
    args = build_parser().parse_args([])
    assert {k: getattr(args, k) for k in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS


def test_original_flag_spellings_are_accepted(tmp_path):
    args = build_parser().parse_args(
        ["--lora_rank", "8", "--use_fsdp", "--sync_text_encoder", "--trainable_modules", "attn", "proj_out"]
        + ["--local_rank", "3", "--streaming", "--num_processes_per_node", "8"]
    )
    assert args.lora_r == 8 and args.parallelism == "fsdp" and args.condition_encoder_mode == "sync"
    flags = ["--pretrained_model_name_or_path", "m", "--train_data_meta_dir", str(tmp_path), "--max_train_steps", "1"]
    config = config_from_args(build_parser().parse_args([*flags, "--trainable_modules", "attn", "proj_out,norm"]))
    assert config.model.trainable_modules == ("attn", "proj_out", "norm")


# --- gradient clipping as the original ---------------------------------------------------------------


def expected_clip(norm, step, max_norm, ratio, start):
    """Independent reading of the original: threshold interpolated linearly over [0, start], then damping."""
    if step < start:
        threshold = max_norm * ratio - (max_norm * ratio - max_norm) * (step / start)
    else:
        threshold = max_norm
    if step > start and norm / threshold > 5:
        return threshold / min(norm / threshold, 10)
    return threshold


@pytest.mark.parametrize(
    "norm,step",
    [(0.5, 0), (3.0, 0), (3.0, 500), (100.0, 999), (4.0, 1000), (6.0, 1000), (6.0, 1001), (7.0, 5000), (500, 5000)],
)
def test_clip_bound_follows_the_original_schedule(norm, step):
    from pipeline.train.engine.clipping import clip_bound

    got = clip_bound(norm, step, 1.0, 5.0, 1000)
    assert math.isclose(got, expected_clip(norm, step, 1.0, 5.0, 1000), rel_tol=1e-9), (norm, step, got)
    assert clip_bound(norm, step, 0.0, 5.0, 1000) == math.inf, "--max_grad_norm 0 turns clipping off"


def test_the_loop_clips_gradients_to_the_bound():
    """The step's clipping on real gradients: the warm threshold early, the damped bound for a spike later."""
    from pipeline.train.config.model import OptimConfig
    from pipeline.train.engine.step import clip_gradients

    layer = torch.nn.Linear(4, 4)
    optim = OptimConfig(max_grad_norm=1.0, initial_grad_norm_ratio=5, abnormal_norm_clip_start=10)

    def clipped(step, scale):
        layer.zero_grad()
        (layer(torch.ones(2, 4)).sum() * scale).backward()
        norm, bound = clip_gradients(list(layer.parameters()), step, optim)
        after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in layer.parameters()]))
        return norm, bound, float(after)

    norm, bound, after = clipped(0, 100.0)
    assert bound == 5.0 and math.isclose(after, 5.0, rel_tol=1e-4) and norm > 5
    norm, bound, after = clipped(20, 100.0)  # a spike after the warm-up: clipped to 1 / min(norm, 10)
    assert bound == pytest.approx(0.1) and math.isclose(after, 0.1, rel_tol=1e-4)
    norm, bound, after = clipped(20, 0.01)  # a small norm is left alone
    assert math.isclose(after, norm, rel_tol=1e-6) and norm < 1


# --- LoRA files at the trained strength --------------------------------------------------------------


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return {
        "hidden_states": torch.randn(1, 16, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, 4, 4)]],
        "return_dict": False,
    }


def comfyui_merge(base_state, lora):
    """ComfyUI's reading of a Qwen-Image LoRA (comfy/lora.py, comfy/weight_adapter/lora.py): modules under
    ``diffusion_model.`` or ``transformer.``; W += s · B @ A with s = alpha / rank when a ``<module>.alpha``
    tensor is there, else 1 (ComfyUI reads no safetensors metadata)."""
    merged = dict(base_state)
    modules = {k[: -len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")}
    assert modules, "no LoRA module found"
    for module in modules:
        a, b = lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"]
        scale = float(lora[f"{module}.alpha"]) / a.shape[0] if f"{module}.alpha" in lora else 1.0
        key = module.removeprefix("diffusion_model.").removeprefix("transformer.") + ".weight"
        merged[key] = base_state[key] + scale * (b.float() @ a.float()).to(base_state[key].dtype)
    return merged


def test_exported_lora_loads_at_the_trained_strength_in_diffusers_and_comfyui(tiny_model_dir, tmp_path):
    from diffusers import QwenImageEditPlusPipeline

    from pipeline.families.qwen_edit import FAMILY
    from pipeline.train.engine.model import add_lora, export_lora, load_transformer

    rank, alpha = 4, 12.0  # alpha != rank: a loader that ignores alpha applies the update at 1/3
    trained = load_transformer(str(tiny_model_dir))
    base_state = {k: v.clone() for k, v in trained.state_dict().items()}
    add_lora(trained, rank, alpha, 0.0, ["to_q", "to_k", "to_v", "img_mlp.net.2"], None, seed=0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:  # a trained adapter: B is no longer zero
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    trained.eval()
    inputs = transformer_inputs(trained)
    with torch.no_grad():
        expected = trained(**inputs)[0]
    written = export_lora(trained, tmp_path, None, "both")
    assert set(written) == {"diffusers", "comfyui"} and (tmp_path / FAMILY.lora_files["comfyui"]).exists()

    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        plain = pipe.transformer(**inputs)[0]
    pipe.load_lora_weights(written["diffusers"])
    with torch.no_grad():
        loaded = pipe.transformer(**inputs)[0]
    assert not torch.allclose(plain, expected, atol=1e-4), "the adapter matters"
    # the same fp32 math in another order (x·W + s·x·Aᵀ·Bᵀ vs x·(W + s·B·A)): each matmul of ≤ 64 terms rounds
    # by ≲ 64·6e-8 ≈ 4e-6 relative over two blocks; rtol 1e-4 / atol 1e-5 leave ≥ 20× for any CPU's kernels,
    # while a wrong strength (alpha ignored) moves outputs by the adapter's share, far above them (checked above)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-4)

    comfy = load_file(written["comfyui"])
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in comfy)
    assert {float(v) for k, v in comfy.items() if k.endswith(".alpha")} == {alpha}
    # every file at the trained strength in ComfyUI's reading too (the diffusers one has no .alpha tensors:
    # its scaling is folded into lora_B), and the ComfyUI file in diffusers
    for name, path in written.items():
        fresh = load_transformer(str(tiny_model_dir))
        fresh.load_state_dict(comfyui_merge(base_state, load_file(path)))
        with torch.no_grad():
            merged = fresh.eval()(**inputs)[0]
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-4, msg=f"{name} file in ComfyUI")
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(written["comfyui"])
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs)[0], expected, atol=1e-5, rtol=1e-4)


def test_a_single_state_dict_file_loads_into_the_base_model(tiny_model_dir, tmp_path):
    from pipeline.train.engine.model import load_transformer

    base = load_transformer(str(tiny_model_dir))
    changed = {f"model.diffusion_model.{k}": v + 1 for k, v in base.state_dict().items() if k.startswith("proj_out")}
    save_file(changed, str(tmp_path / "partial.safetensors"))
    loaded = load_transformer(str(tiny_model_dir), str(tmp_path / "partial.safetensors"))
    state = loaded.state_dict()
    assert torch.equal(state["proj_out.weight"], base.state_dict()["proj_out.weight"] + 1)
    assert torch.equal(state["img_in.weight"], base.state_dict()["img_in.weight"]), "the rest stays the base"
    save_file({"not_a_layer.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not_a_layer"):
        load_transformer(str(tiny_model_dir), str(tmp_path / "other.safetensors"))


# --- loss per task and per N across ranks ------------------------------------------------------------


def test_loss_board_averages_every_ranks_batches_and_keeps_running_means():
    from pipeline.train.engine.metrics import LossBoard, group_of

    board = LossBoard(["b", "a"], window=2)
    rank0, rank1 = board.encode([("a", 1, 1.0)]), board.encode([("b", 2, 3.0)])
    logs = board.add(torch.stack([rank0, rank1]))
    assert logs == {
        "loss": 2.0,
        "loss_by_task/a": 1.0,
        "loss_by_task/b": 3.0,
        "loss_by_sources/1": 1.0,
        "loss_by_sources/2": 3.0,
    }
    logs = board.add(torch.cat([board.encode([("a", 1, 3.0)]), board.encode([("a", 2, 5.0)])]))
    assert logs["loss"] == 4.0 and logs["loss_by_task/a"] == 4.0, "window of 2: the last two of task a"
    assert "loss_by_task/b" not in logs and logs["loss_by_sources/2"] == 4.0
    names = ("transformer_blocks.7.attn.to_q.weight", "img_in.bias", "module.proj_out.weight")
    assert [group_of(n) for n in names] == ["transformer_blocks.7", "img_in", "proj_out"]


# --- recipe files ------------------------------------------------------------------------------------


def test_recipe_flags_are_typed_and_the_command_line_wins(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "train_data_meta_dir": "s3://bucket/meta",
                "train_data_weights": {"edit": 0.5, "compose": 1.5},
                "train_src_img_num_weights": "0=1,1=1",
                "learning_rate": 2e-5,
                "use_peft_lora": True,
                "lora_rank": 16,
                "mixed_precision": False,  # YAML reads `no` as false
                "trainable_modules": ["attn", "proj_out"],
                "train_shards": {"extra": ["a/{0..1}.tar", "b.tar"]},
            },
            sort_keys=False,
        )
    )
    args = parse_with_recipe(build_parser(), ["--config", str(recipe), "--learning_rate", "3e-4"])
    assert args.learning_rate == 3e-4 and args.lora_r == 16 and args.use_peft_lora
    assert args.train_data_weights == "edit=0.5,compose=1.5" and args.mixed_precision == "no"
    assert args.trainable_modules == ["attn", "proj_out"]
    assert args.train_shards == ["extra=a/{0..1}.tar", "extra=b.tar"]
    args = parse_with_recipe(build_parser(), ["--config", str(recipe), "--train_shards", "x=y.tar"])
    assert args.train_shards == ["x=y.tar"], "a list on the command line replaces the recipe's"


@pytest.mark.parametrize(
    "content,message",
    [
        ({"learning_rat": 1e-4}, "unknown key 'learning_rat'"),
        ({"use_peft_lora": "yes please"}, "use_peft_lora: expected true or false"),
        ({"learning_rate": [1, 2]}, "learning_rate: takes one value"),
        ([1, 2], "expected a mapping"),
        ("train_data_weights: {edit: .inf, compose: 1}\n", "train_data_weights: the weight of 'edit' must be a finite"),
        ("train_data_weights: {edit: .nan}\n", "train_data_weights: the weight of 'edit' must be a finite"),
        ("learning_rate: 1e-4\nlora_r: 8\nlearning_rate: 2e-4\n", "line 3: learning_rate is given twice"),
        ("train_data_weights: {edit: 1, edit: 2}\n", "line 1: edit is given twice"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, content, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    with pytest.raises(RecipeError, match=message) as error:
        parse_with_recipe(build_parser(), ["--config", str(recipe)])
    assert str(recipe) in str(error.value)


def test_weights_on_the_command_line_are_finite():
    from pipeline.train.config.data import parse_weights

    for text in ("a=inf", "a=1,b=-inf", "a=nan"):
        with pytest.raises(ValueError, match="finite number >= 0"):
            parse_weights(text, "--train_data_weights")


def test_resume_reports_changed_settings_and_refuses_another_model(tmp_path, caplog):
    first = vars(build_parser().parse_args(["--pretrained_model_name_or_path", "m", "--train_data_weights", "a=1,b=2"]))
    write_recipe(tmp_path, first, 0, {})
    same = dict(first, train_data_weights="b=2,a=1", max_train_steps=900, resume_from_checkpoint="latest")
    assert check_resume_recipe(tmp_path, same, 100, False) == {}, "order of weights and run-only flags do not count"
    mix = dict(first, train_data_weights="a=1,b=5")
    with caplog.at_level("WARNING"):
        changes = check_resume_recipe(tmp_path, mix, 100, False)
    assert set(changes) == {"train_data_weights"} and "train_data_weights" in caplog.text
    other = dict(first, lora_alpha=8.0)
    with pytest.raises(RecipeError, match="lora_alpha: 32.0 -> 8.0"):
        check_resume_recipe(tmp_path, other, 100, False)
    assert check_resume_recipe(tmp_path, other, 100, True)
    write_recipe(tmp_path, mix, 100, changes)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train_data_weights"] == "a=1,b=5"
    assert len(list(tmp_path.glob("config-before-step-100-*.yaml"))) == 1, "the earlier settings are kept"


# --- captions in any script --------------------------------------------------------------------------


def make_cjk_font(path, chars="中文字天空"):
    """A tiny TrueType font whose glyphs for ``chars`` are filled squares (fontTools, no system font needed)."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def square(size):
        pen = TTGlyphPen(None)
        pen.moveTo((50, 0)), pen.lineTo((50, size)), pen.lineTo((size, size)), pen.lineTo((size, 0)), pen.closePath()
        return pen.glyph()

    names = [".notdef"] + [f"uni{ord(c):04X}" for c in chars]
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({ord(c): f"uni{ord(c):04X}" for c in chars})
    empty = TTGlyphPen(None).glyph()
    fb.setupGlyf({".notdef": empty, **{n: square(700 + 20 * i) for i, n in enumerate(names[1:])}})
    fb.setupHorizontalMetrics({n: (1000, 0) for n in names})
    fb.setupHorizontalHeader(ascent=900, descent=-100)
    fb.setupNameTable({"familyName": "TestCJK", "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=900, usWinAscent=900, usWinDescent=100)
    fb.setupPost()
    fb.save(str(path))
    return path


def test_captions_use_a_font_that_has_the_glyphs(tmp_path):
    from PIL import Image, ImageFont

    from pipeline.common.preview import contact_sheet, has_glyphs

    font_file = make_cjk_font(tmp_path / "cjk.ttf")
    cjk = ImageFont.truetype(str(font_file), 14)
    assert has_glyphs(cjk, "中文") and not has_glyphs(cjk, "中文X")
    latin = ImageFont.truetype("DejaVuSans.ttf", 14) if _has_dejavu() else ImageFont.load_default(14)
    assert not has_glyphs(latin, "中文"), "a Latin font draws boxes for CJK"
    picture = Image.new("RGB", (64, 64), "red")
    with_font = contact_sheet([([picture], "中文字")], font_path=str(font_file))
    captions = with_font.crop((0, 200, with_font.width, with_font.height)).convert("L")
    assert min(captions.getdata()) < 50, "the caption's glyphs are drawn"
    wrapped = contact_sheet([([picture], "天空" * 40)], font_path=str(font_file))
    assert wrapped.size == with_font.size, "long captions wrap into the caption lines"


def _has_dejavu() -> bool:
    from PIL import ImageFont

    try:
        ImageFont.truetype("DejaVuSans.ttf", 14)
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "script,recipe",
    [("train_fsdp.sh", "train_fsdp.yaml"), ("train_lora.sh", "train_lora.yaml"), ("s3_workflow.sh", "s3_train.yaml")],
)
def test_each_example_recipe_equals_its_script(script, recipe):
    """examples/recipes/*.yaml hold exactly the flags of the shipped scripts' training commands."""
    import shlex
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    text = (examples / script).read_text().replace("\\\n", " ")
    command = next(line for line in text.splitlines() if "-m pipeline.train" in line)
    flags = shlex.split(command.split("-m pipeline.train", 1)[1])
    from_script = vars(build_parser().parse_args(flags))
    from_recipe = vars(parse_with_recipe(build_parser(), ["--config", str(examples / "recipes" / recipe)]))
    assert from_recipe.pop("config") and from_script.pop("config") is None
    assert from_recipe == from_script
