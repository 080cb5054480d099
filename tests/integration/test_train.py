"""The trainer: it learns, trains only what it should, resumes bit for bit, exports what diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TRAIN_BASE as BASE
from helpers import extract, generate_edit, no_traceback_of_ours, run_module, train, transformer_weights
from safetensors.torch import load_file


@pytest.mark.slow
def test_overfitting_a_handful_of_samples_drives_the_loss_down(tiny_model_dir, edit_meta, tmp_path):
    from pipeline.shards.tasks import discover_tasks
    from pipeline.train.config.data import StreamConfig
    from pipeline.train.config.model import FlowConfig
    from pipeline.train.engine import step as trainer_mod
    from pipeline.train.engine.model import load_scheduler, load_transformer, load_vae
    from pipeline.train.stream.dataset import MixedBatchDataset
    from pipeline.train.stream.mix import plan_mix

    tasks = discover_tasks(str(edit_meta), None)
    dataset = MixedBatchDataset(
        tasks,
        plan_mix(tasks, {"four": 1}, {"1": 1}),
        0,
        1,
        StreamConfig(batch_size=4, seed=1, shuffle_buffer=0, image_sample_size=64, text_drop_ratio=0.0),
    )
    batch = next(iter(dataset))
    args = FlowConfig(
        vae_mini_batch=4,
        seed=0,
        sampling_steps=1000,
        uniform_sampling=False,
        weighting_scheme="none",
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
    )
    model_dir = str(tiny_model_dir)
    vae, sched = load_vae(model_dir), load_scheduler(model_dir)

    def loss_with(transformer):
        with torch.no_grad():
            return float(
                sum(trainer_mod.batch_loss(batch, transformer, vae, sched, args, 0, 1, s) for s in range(8)) / 8
            )

    before = loss_with(load_transformer(model_dir))
    out = tmp_path / "run"
    train(
        tiny_model_dir,
        edit_meta,
        out,
        "--max_train_steps",
        "150",
        "--checkpointing_steps",
        "1000",
        "--learning_rate",
        "2e-3",
        "--train_batch_size",
        "4",
        "--text_drop_ratio",
        "0",
        "--shuffle_buffer",
        "0",
        "--seed",
        "1",
        "--lr_scheduler",
        "constant_with_warmup",
        "--lr_warmup_steps",
        "10",
    )
    after = loss_with(load_transformer(str(out / "transformer"), str(out / "transformer")))
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_full_finetune_trains_only_the_chosen_modules(tiny_model_dir, edit_meta, tmp_path):
    out = tmp_path / "partial"
    train(
        tiny_model_dir,
        edit_meta,
        out,
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "100",
        "--learning_rate",
        "1e-2",
        "--trainable_modules",
        "transformer_blocks.1.",
        "--trainable_modules_low_learning_rate",
        "proj_out",
    )
    base = transformer_weights(tiny_model_dir / "transformer")
    tuned = transformer_weights(out / "transformer")
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith(("transformer_blocks.1.", "proj_out")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("proj_out") for k in changed) and any(
        k.startswith("transformer_blocks.1.") for k in changed
    )
    ckpt = load_file(str(out / "checkpoint-3" / "trainable.safetensors"))
    assert set(ckpt) == {k for k in base if k.startswith(("transformer_blocks.1.", "proj_out"))}
    groups = json.loads((out / "checkpoint-3" / "optimizer.json").read_text())["param_groups"]
    assert sorted(g["lr"] for g in groups) == [5e-3, 1e-2], "low-LR modules train at half the LR"
    # exporting a checkpoint on request gives the same transformer as the end of the run
    exported = tmp_path / "exported"
    train(
        tiny_model_dir,
        edit_meta,
        exported,
        "--max_train_steps",
        "3",
        "--trainable_modules",
        "transformer_blocks.1.",
        "--trainable_modules_low_learning_rate",
        "proj_out",
        "--export_checkpoint",
        str(out / "checkpoint-3"),
    )
    again = transformer_weights(exported / "transformer")
    assert again.keys() == tuned.keys() and all(torch.equal(again[k], tuned[k]) for k in tuned)


@pytest.mark.slow
def test_lora_trains_only_the_adapter_and_both_exports_load_in_diffusers(
    tiny_model_dir, edit_meta, tmp_path, small_vae_inputs
):
    import shutil

    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    out = tmp_path / "lora"
    train(
        tiny_model_dir,
        edit_meta,
        out,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--learning_rate",
        "1e-2",
        "--use_peft_lora",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "4",
        "--checkpoints_total_limit",
        "1",
    )
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"], "total limit prunes older checkpoints"
    adapter = load_file(str(out / "checkpoint-4" / "trainable.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter}
    assert {"to_q", "to_k", "to_v", "add_q_proj"} <= targets | {k.split(".lora_")[0].split(".")[-1] for k in adapter}
    lora_file = out / "pytorch_lora_weights.safetensors"
    assert lora_file.exists()

    # a checkpoint whose weights file lacks trained parameters (recorded as saved, so only the keys can tell)
    from safetensors.torch import save_file

    from pipeline.train.engine.checkpoint import folders, integrity

    lacking = tmp_path / "lacking"
    lacking.mkdir()
    shutil.copytree(out / "checkpoint-4", lacking / "checkpoint-4")
    weights = lacking / "checkpoint-4" / "trainable.safetensors"
    dropped = sorted(adapter)[:2]
    save_file({k: v for k, v in adapter.items() if k not in dropped}, str(weights))
    marker = folders.read_marker(lacking / "checkpoint-4")
    marker["files"]["trainable.safetensors"] = integrity.file_record(weights)
    (lacking / "checkpoint-4" / folders.MARKER).write_text(json.dumps(marker))
    lora_flags = ["--use_peft_lora", "--lora_rank", "4", "--lora_alpha", "4"]
    refused = run_module(
        "pipeline.train", "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_meta_dir",
        str(edit_meta), "--output_dir", str(lacking), *BASE, "--max_train_steps", "5", *lora_flags,
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert refused.returncode == 2 and no_traceback_of_ours(refused.stderr)
    assert f"{weights} lacks 2 of the run's trainable parameters" in refused.stderr and dropped[0] in refused.stderr

    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir)
    base = generate_edit(pipe)
    pipe.load_lora_weights(str(lora_file))
    with_lora = generate_edit(pipe)
    assert with_lora.shape == base.shape and not (with_lora == base).all(), "the LoRA changes the output"

    full = tmp_path / "full"
    train(
        tiny_model_dir,
        edit_meta,
        full,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "100",
        "--learning_rate",
        "1e-2",
    )
    tuned = QwenImageTransformer2DModel.from_pretrained(full / "transformer")
    pipe2 = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir, transformer=tuned)
    image = generate_edit(pipe2)
    assert image.shape == (64, 64, 3) and not (image == base).all()
    assert (full / "first_batch.png").exists()


@pytest.mark.slow
def test_ddp_two_processes_resume_is_bitwise_identical(tiny_model_dir, meta_dir, sample_data_dir, tmp_path):
    common = [
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "3",
        "--learning_rate",
        "5e-3",
        "--train_batch_size",
        "2",
        "--enable_inverse",
        "--uniform_sampling",
        "--dataloader_num_workers",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--report_to",
        "tensorboard",
        "--train_src_img_num_weights",
        "0=1,1=1,2=1,3=1",
    ]
    straight = tmp_path / "straight"
    validation = tmp_path / "validation.jsonl"  # 2 rows: each rank renders one (DDP splits the rows)
    source = sample_data_dir / "edit_single" / "images" / "0000_src.jpg"
    rows = [{"source_image": str(source), "instruction": "Make it blue."}, {"instruction": "A red cube."}]
    validation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rendering = ["--validation_jsonl", str(validation), "--validation_steps", "6", "--validation_inference_steps", "1"]
    train(tiny_model_dir, meta_dir, straight, *common, "--data_trace", str(tmp_path / "a.jsonl"), *rendering, nproc=2)
    rendered = straight / "validation" / "step-000006"
    assert {p.name for p in rendered.iterdir()} == {"row-00.png", "row-01.png", "sheet.png"}
    resumed = tmp_path / "resumed"
    first = [c if c != "6" else "3" for c in common]
    train(tiny_model_dir, meta_dir, resumed, *first, "--data_trace", str(tmp_path / "b0.jsonl"), nproc=2)
    train(
        tiny_model_dir,
        meta_dir,
        resumed,
        *common,
        "--resume_from_checkpoint",
        "latest",
        "--data_trace",
        str(tmp_path / "b.jsonl"),
        nproc=2,
    )

    def lines(path):
        return sorted(json.dumps(json.loads(x), sort_keys=True) for x in path.read_text().splitlines())

    straight_lines = lines(tmp_path / "a.jsonl")
    assert len(straight_lines) == 12  # 6 steps x 2 ranks
    resumed_part = lines(tmp_path / "b.jsonl")
    assert len(resumed_part) == 6 and all(json.loads(x)["step"] > 3 for x in resumed_part)
    assert sorted(lines(tmp_path / "b0.jsonl") + resumed_part) == straight_lines
    a, b = transformer_weights(straight / "transformer"), transformer_weights(resumed / "transformer")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ after resume"
    base = transformer_weights(tiny_model_dir / "transformer")
    assert any(not torch.equal(a[k], base[k]) for k in a)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((straight / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "samples_per_s", "data_wait_fraction"} <= tags
    assert len(events.Scalars("loss")) == 6
    assert any(t.startswith("loss_by_task/") for t in tags) and any(t.startswith("loss_by_sources/") for t in tags)
    # the logged loss is the mean over both ranks' batches, not rank 0's alone
    mean, rank0 = [e.value for e in events.Scalars("loss")], [e.value for e in events.Scalars("rank_loss")]
    assert any(abs(a - b) > 1e-6 for a, b in zip(mean, rank0, strict=True))


@pytest.mark.slow
def test_sync_mode_encodes_like_offline_extraction(sample_data_dir, tiny_model_dir, tmp_path):
    from pipeline.shards.format import npy_to_embedding
    from pipeline.shards.tasks import discover_tasks
    from pipeline.train.config.data import StreamConfig
    from pipeline.train.engine.step import encode_online
    from pipeline.train.stream.dataset import MixedBatchDataset
    from pipeline.train.stream.mix import plan_mix

    for name, extra in (("offline", ["--batching", "exact"]), ("online", ["--skip_embeddings"])):
        extract(sample_data_dir / "compose_multi" / "data.jsonl", tmp_path / name / "task", tiny_model_dir, *extra)
    config = StreamConfig(
        batch_size=1, seed=2, shuffle_buffer=0, image_sample_size=64, text_drop_ratio=0.3, online_prompts=True
    )
    tasks = discover_tasks(str(tmp_path / "online"), None)
    assert not any(k.startswith("emb_") for k in tasks["task"].manifest["variants"])
    dataset = MixedBatchDataset(tasks, plan_mix(tasks, {"task": 1}, {"2": 1, "3": 1}), 0, 1, config)
    from pipeline.families.qwen_edit.encoder import PromptBuilder, PromptEncoder

    builder, encoder = PromptBuilder(str(tiny_model_dir)), PromptEncoder(str(tiny_model_dir))
    offline = read_offline(tmp_path / "offline" / "task")
    checked = set()
    for _, batch in zip(range(10), iter(dataset), strict=False):
        assert "prompt_embeds" not in batch
        encode_online(batch, builder, encoder)
        key, variant = batch["keys"][0], batch["variants"][0]
        stored = npy_to_embedding(offline[key][f"emb_{variant}.npy"])
        length = int(batch["prompt_mask"][0].sum())
        assert torch.equal(batch["prompt_embeds"][0, :length], stored), (key, variant)
        checked.add(variant)
    assert {"en", "cn", "drop"} & checked and len(checked) >= 2


def read_offline(task_dir: Path):
    from helpers import read_samples

    return read_samples(str(task_dir))


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_never_checkpointed(tiny_model_dir, edit_meta, tmp_path):
    out = tmp_path / "diverges"
    # 1e6: the largest rate the flag takes (Adam moves every weight by ~1e6 in the first step, the next steps are NaN)
    flags = ["--max_train_steps", "12", "--checkpointing_steps", "1", "--learning_rate", "1e6", "--max_grad_norm", "0"]
    result = run_module(
        "pipeline.train",
        "--pretrained_model_name_or_path",
        str(tiny_model_dir),
        "--train_data_meta_dir",
        str(edit_meta),
        "--output_dir",
        str(out),
        *BASE,
        *flags,
        "--max_nonfinite_steps",
        "3",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "non-finite gradient norm" in result.stderr and "update skipped" in result.stderr
    saved = sorted(out.glob("checkpoint-*"))
    assert saved and len(saved) < 12, "the run stopped early"
    for folder in saved:
        weights = load_file(str(folder / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), f"{folder.name} holds NaN/Inf weights"


def tensorboard_events(folder: Path) -> tuple[set[str], set[str]]:
    """(scalar tags, image tags) written by the run's TensorBoard tracker."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for events in folder.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


@pytest.mark.slow
def test_validation_images_recipe_resume_by_name_and_lora_in_every_checkpoint(
    tiny_model_dir, edit_meta, sample_data_dir, tmp_path
):
    import numpy as np
    import yaml
    from PIL import Image

    out = tmp_path / "run"
    source = sample_data_dir / "edit_single" / "images" / "0000_src.jpg"
    rows = [
        {"source_image": str(source), "instruction": "Make it blue."},
        {"source_image": None, "instruction_cn": "一只猫坐在窗台上。"},
    ]
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "pretrained_model_name_or_path": str(tiny_model_dir),
                "train_data_meta_dir": str(edit_meta),
                "output_dir": str(out),
                "train_batch_size": 1,
                "image_sample_size": 64,
                "seed": 3,
                "train_src_img_num_weights": {1: 1},
                "learning_rate": 1e-2,
                "lr_warmup_steps": 0,
                "checkpointing_steps": 2,
                "use_peft_lora": True,
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_export_format": "both",
                "validation_jsonl": str(validation),
                "validation_steps": 2,
                "validation_inference_steps": 2,
                "report_to": "tensorboard",
                "report_model_info": True,
            },
            allow_unicode=True,
        )
    )
    run_module("pipeline.train", "--config", str(recipe), "--max_train_steps", "4", check=True)

    def rendered(step: int) -> list[np.ndarray]:
        folder = out / "validation" / f"step-{step:06d}"
        assert (folder / "sheet.png").exists()
        return [np.asarray(Image.open(folder / f"row-{i:02d}.png")) for i in range(len(rows))]

    at_2, at_4 = rendered(2), rendered(4)
    assert all(a.shape[0] * a.shape[1] <= 2 * 64 * 64 for a in at_2), "rendered at the training area"
    assert any(not np.array_equal(a, b) for a, b in zip(at_2, at_4, strict=True)), "training changes the images"
    for step in (2, 4):
        folder = out / f"checkpoint-{step}"
        assert (folder / "pytorch_lora_weights.safetensors").exists()
        assert (folder / "qwen_image_edit_lora_comfyui.safetensors").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["lora_alpha"] == 8
    scalars, images = tensorboard_events(out / "logs")
    assert {"loss", "loss_by_task/four", "loss_by_sources/1", "validation_seconds", "clip_bound"} <= scalars
    assert any(t.startswith("grad_norm_by_group/transformer_blocks.") for t in scalars), "--report_model_info"
    assert "validation/sheet" in images

    # a rerun of steps 3-4 from the checkpoint's name renders the same pixels at step 4
    run_module(
        "pipeline.train",
        "--config",
        str(recipe),
        "--max_train_steps",
        "4",
        "--resume_from_checkpoint",
        "checkpoint-2",
        check=True,
    )
    assert all(np.array_equal(a, b) for a, b in zip(at_4, rendered(4), strict=True))
