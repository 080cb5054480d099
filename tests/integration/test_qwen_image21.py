"""Qwen-Image 2.1 through the same three commands as 2509, on the tiny random 2.1: extraction writes format v2 whose
rows and slots give back the pipeline's own embeddings; the stream shows fixed conditions to the VAE resized, never
cropped; LoRA and full training (one process and FSDP) export files diffusers loads; a resume is exact; batches of
two and shards of another family are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TRAIN_BASE, extract, no_traceback_of_ours, run_module, train, transformer_weights
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

RESOLUTION = "384"  # --condition_resolution: small conditions keep the tiny model quick


@pytest.fixture(scope="module")
def meta21(sample_data_dir, tiny_21_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("meta21")
    for task in ("edit_single", "text_to_image", "compose_multi"):
        extract(sample_data_dir / task / "data.jsonl", root / task, tiny_21_dir, "--condition_resolution", RESOLUTION,
                "--batching", "exact")  # fmt: skip
    return root


class Sample:
    def __init__(self, key: str, members: dict[str, bytes]):
        self.key, self.members = key, members


def first_sample(task_dir) -> Sample:
    return _all_samples(task_dir)[0]


def test_extraction_writes_v2_whose_rows_and_slots_give_back_the_pipelines_embeddings(meta21, tiny_21_dir):
    from diffusers import QwenImage21Pipeline

    from pipeline.common.images import open_rgba
    from pipeline.families.qwen_image21.encoder import PromptBuilder
    from pipeline.families.qwen_image21.forward import full_prompt
    from pipeline.shards.format import npy_to_embedding

    manifest = json.loads((meta21 / "edit_single" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["family"] == "qwen_image21"
    assert manifest["condition_resolution"] == int(RESOLUTION) and manifest["drop_index"]["edit"] > 0
    null = npy_to_embedding((meta21 / "text_to_image" / "null_embedding.npy").read_bytes())
    pipe = QwenImage21Pipeline.from_pretrained(tiny_21_dir)
    reference_null, _, _ = pipe._get_qwen_prompt_embeds([""], None, device="cpu")
    assert torch.equal(null, reference_null[0].to(torch.bfloat16)), "the null embedding is ' ' as the pipeline's"

    sample = first_sample(meta21 / "edit_single")
    meta = json.loads(sample.members["json"])
    source = open_rgba(sample.members[meta["sources"][0]["member"]])
    conditions = PromptBuilder(tiny_21_dir, int(RESOLUTION)).condition_images([source])
    assert meta["conditions"]["sources"] == [list(c.size) for c in conditions], "the size the encoder saw"
    for variant, text in (("en", meta["instruction"]), ("drop", "")):
        entry = meta["variants"][variant]
        rows = npy_to_embedding(sample.members[f"emb_{variant}.npy"])
        assert entry["shape"] == list(rows.shape)
        embeds, _, pad_mask = pipe._get_qwen_prompt_embeds([text], conditions, device="cpu")
        full, mask = full_prompt(rows, entry["slots"])
        assert torch.equal(mask, pad_mask[0])
        assert torch.equal(full[~mask], embeds[0][~pad_mask[0]].to(torch.bfloat16)), variant
        (_, h32, w32), condition = entry["slots"][0], conditions[0]
        assert (h32, w32) == (condition.height // 32, condition.width // 32)
    inverse = [s for s in _all_samples(meta21 / "edit_single") if "emb_en_inv.npy" in s.members][0]
    meta = json.loads(inverse.members["json"])
    target = PromptBuilder(tiny_21_dir, int(RESOLUTION)).condition_images(
        [open_rgba(inverse.members[meta["target"]["member"]])]
    )
    assert meta["conditions"]["target"] == [list(target[0].size)], "an inverse variant is conditioned on the target"
    embeds, _, pad_mask = pipe._get_qwen_prompt_embeds([meta["inverse_instruction"]], target, device="cpu")
    full, mask = full_prompt(npy_to_embedding(inverse.members["emb_en_inv.npy"]), meta["variants"]["en_inv"]["slots"])
    assert torch.equal(mask, pad_mask[0]) and torch.equal(full[~mask], embeds[0][~pad_mask[0]].to(torch.bfloat16))


def test_the_stream_shows_each_condition_resized_to_its_stored_size_never_cropped(meta21, tiny_21_dir):
    from diffusers import QwenImage21Pipeline

    from pipeline.common.images import open_rgba
    from pipeline.shards.tasks import discover_tasks
    from pipeline.train.config.data import StreamConfig
    from pipeline.train.stream.dataset import MixedBatchDataset
    from pipeline.train.stream.mix import plan_mix

    pipe = QwenImage21Pipeline.from_pretrained(tiny_21_dir)
    tasks = discover_tasks(str(meta21), None, {"edit_single"})
    config = StreamConfig(batch_size=1, seed=1, image_sample_size=64, text_drop_ratio=0.0, readahead_bytes=0)
    stream = iter(MixedBatchDataset(tasks, plan_mix(tasks, {"edit_single": 1}, {"1": 1}), 0, 1, config))
    samples = {s.key: s for s in _all_samples(meta21 / "edit_single")}
    for _ in range(4):
        batch = next(stream)
        sample = samples[batch["keys"][0]]
        meta = json.loads(sample.members["json"])
        role = "target" if batch["variants"][0].endswith("_inv") else "sources"
        member = meta["target"]["member"] if role == "target" else meta["sources"][0]["member"]
        width, height = meta["conditions"][role][0]
        expected = np.asarray(pipe.image_processor.resize(open_rgba(sample.members[member]), height, width))
        assert torch.equal(batch["sources"][0][0], torch.from_numpy(expected).permute(2, 0, 1))
        assert batch["target"].shape[1] == 4, "RGBA targets"
        assert batch["image_pad_mask"].sum() == (width // 32) * (height // 32)


def _all_samples(task_dir) -> list[Sample]:
    from pipeline.shards.reader import iter_samples

    return [Sample(k, m) for shard in sorted(task_dir.rglob("*.tar")) for k, m in iter_samples(str(shard), None)]


LORA = ["--use_peft_lora", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--checkpointing_steps",
        "2", "--train_src_img_num_weights", "0=1,1=1,2=1", "--lora_export_format", "both"]  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(meta21, tiny_21_dir, tmp_path_factory):
    """A LoRA run of 4 steps, checkpoints at 2 and 4, both export formats."""
    out = tmp_path_factory.mktemp("lora21") / "run"
    train(tiny_21_dir, meta21, out, *LORA, "--max_train_steps", "4")
    return out


def test_lora_exports_load_in_diffusers_at_the_trained_strength_and_comfyui_keys_keep_the_mlp(lora_run, tiny_21_dir):
    from diffusers import QwenImage21Pipeline

    out = lora_run
    file = load_file(str(out / "pytorch_lora_weights.safetensors"))
    targets = {
        k.split(".transformer_blocks.0.", 1)[1].split(".lora_")[0] for k in file if ".transformer_blocks.0." in k
    }
    assert targets == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
                       "img_mlp.out"}, "the 7 block Linears by default"  # fmt: skip
    comfy = load_file(str(out / "qwen_image21_lora_comfyui.safetensors"))
    assert all(k.startswith("transformer.") for k in comfy), "not diffusion_model.: ComfyUI drops those MLP halves"
    assert any(".img_mlp.gate_layer.lora_A" in k for k in comfy) and any(k.endswith(".alpha") for k in comfy)

    pipe = QwenImage21Pipeline.from_pretrained(tiny_21_dir)
    name = "transformer_blocks.1.img_mlp.gate_layer"
    before = dict(pipe.transformer.named_parameters())[f"{name}.weight"].detach().clone()
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    pipe.fuse_lora()
    after = dict(pipe.transformer.named_parameters())[f"{name}.base_layer.weight"].detach()
    a, b = file[f"transformer.{name}.lora_A.weight"].float(), file[f"transformer.{name}.lora_B.weight"].float()
    # the file folds alpha / r into B (loaded with alpha = r, scale 1): the weight moves by B·A. Each fp32 element:
    # fusing rounds W + BA once (≤ ulp of |W| + |BA|), the rank-4 dot product rounds at most 4 times (≤ 4 ulp of
    # Σ|b||a|), and the subtraction once more; 8 eps of their largest magnitudes covers all, on any CPU
    magnitude = before.abs().max() + (b.abs() @ a.abs()).max()
    assert torch.allclose(after - before, b @ a, rtol=0, atol=8 * torch.finfo(torch.float32).eps * magnitude)
    assert (b @ a).abs().max() > 0, "the adapter trained"


def test_full_training_under_fsdp_exports_a_transformer_diffusers_loads(meta21, tiny_21_dir, tmp_path):
    from diffusers import QwenImage21Transformer2DModel

    out = tmp_path / "full"
    result = train(tiny_21_dir, meta21, out, "--max_train_steps", "3", "--parallelism", "fsdp",
                   "--train_src_img_num_weights", "0=1,1=1,2=1", nproc=2)  # fmt: skip
    assert "final loss nan" not in result.stderr and "non-finite" not in result.stderr, result.stderr[-2000:]
    loaded = QwenImage21Transformer2DModel.from_pretrained(out / "transformer")
    exported = transformer_weights(out / "transformer")
    base = transformer_weights(tiny_21_dir / "transformer")
    assert dict(loaded.state_dict()).keys() == exported.keys()
    assert any(not torch.equal(exported[k], base[k]) for k in base), "the weights trained"


def test_a_resume_ends_bit_equal_to_a_straight_run(lora_run, meta21, tiny_21_dir, tmp_path):
    resumed = tmp_path / "resumed"
    train(tiny_21_dir, meta21, resumed, *LORA, "--max_train_steps", "2")
    train(tiny_21_dir, meta21, resumed, *LORA, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    name = "pytorch_lora_weights.safetensors"
    expected, got = load_file(str(lora_run / name)), load_file(str(resumed / name))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def one_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert no_traceback_of_ours(result.stderr) and "Traceback" not in result.stderr, result.stderr[-3000:]
    return next(line for line in result.stderr.splitlines() if " ERROR " in line)


def test_two_rows_per_batch_and_shards_of_the_other_family_are_refused(
    meta21, tiny_21_dir, tiny_model_dir, edit_meta, tmp_path
):
    def run(model, meta, *extra):
        return run_module("pipeline.train", "--pretrained_model_name_or_path", str(model), "--train_data_meta_dir",
                          str(meta), "--output_dir", str(tmp_path / "out"), *TRAIN_BASE, "--max_train_steps", "1",
                          *extra)  # fmt: skip

    line = one_line(run(tiny_21_dir, meta21, "--train_batch_size", "2"))
    assert "--train_batch_size 2" in line and "qwen_image21" in line
    line = one_line(run(tiny_21_dir, meta21, "--condition_encoder_mode", "sync"))
    assert "--condition_encoder_mode sync" in line and "qwen_image21" in line
    line = one_line(run(tiny_21_dir, edit_meta))
    assert "another model family than the model's (qwen_image21)" in line and "qwen_edit" in line
    line = one_line(run(tiny_model_dir, meta21))  # and the reverse: 2.1 shards on the 2509 model
    assert "another model family than the model's (qwen_edit)" in line and "qwen_image21" in line


def test_the_plan_knows_qwen_image_21(capsys):
    from pipeline import families
    from pipeline.train.cli import main
    from pipeline.train.engine.plan import build_on_meta, read_configs

    assert families.detect("qwen-image-2.1").name == "qwen_image21"
    transformer, vae = build_on_meta(*read_configs("qwen-image-2.1"), "qwen_image21")
    assert sum(p.numel() for p in transformer.parameters()) == 7_115_124_736, "diffusers' published defaults"
    assert vae.config.in_channels == 4 and vae.config.scale_factor_spatial == 16
    assert main(["--plan", "--pretrained_model_name_or_path", "qwen-image-2.1", "--use_peft_lora", "--lora_r", "64",
                 "--gradient_checkpointing", "--image_sample_size", "256"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "transformer parameters 7.12 B, trainable 167.8 M" in out, "r64 on the 7 block Linears"
    assert "batch 1 ×" in out and "which card" in out


def test_extraction_resumes_refuses_another_resolution_and_records_a_condition_it_cannot_size(
    meta21, tiny_21_dir, sample_data_dir, tmp_path
):
    from PIL import Image

    jsonl = sample_data_dir / "edit_single" / "data.jsonl"
    again = extract(jsonl, meta21 / "edit_single", tiny_21_dir, "--condition_resolution", RESOLUTION,
                    "--batching", "exact")  # fmt: skip
    assert "0 line(s) to process on this rank" in again.stderr
    other = extract(jsonl, meta21 / "edit_single", tiny_21_dir, "--condition_resolution", "512", check=False)
    assert other.returncode == 2 and "condition_resolution: 384 then, 512 now" in other.stderr
    Image.new("RGB", (400, 300), "red").save(tmp_path / "src.png")
    Image.new("RGB", (400, 300), "blue").save(tmp_path / "tgt.png")
    (tmp_path / "small.jsonl").write_text(
        json.dumps({"source_image": "src.png", "target_image": "tgt.png", "instruction": "Make it blue."}) + "\n"
    )
    small = extract(tmp_path / "small.jsonl", tmp_path / "out", tiny_21_dir, "--condition_resolution", "256",
                    check=False)  # fmt: skip
    failures = [json.loads(line) for f in (tmp_path / "out" / "_failures").glob("*.jsonl") for line in f.open()]
    assert [f["kind"] for f in failures] == ["condition_refused"], small.stderr[-2000:]
    assert "288x224 = 64512 pixels at --condition_resolution 256" in failures[0]["reason"]


def test_an_fp8_base_with_8bit_adam_trains_qwen_image_21(meta21, tiny_21_dir, tmp_path):
    out = tmp_path / "fp8"
    result = train(tiny_21_dir, meta21, out, "--use_peft_lora", "--lora_r", "4", "--base_weight_dtype",
                   "float8_e4m3fn", "--use_8bit_adam", "--max_train_steps", "2")  # fmt: skip
    assert "non-finite" not in result.stderr and (out / "pytorch_lora_weights.safetensors").is_file()


def test_sigterm_saves_and_the_resume_ends_bit_equal_for_qwen_image_21(meta21, tiny_21_dir, tmp_path):
    """The run-folder lifecycle is the family's too: SIGTERM mid-run saves one checkpoint and exits 143; the resume
    from latest ends with the LoRA of a run never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO

    steps = ["--max_train_steps", "12"]
    train(tiny_21_dir, meta21, tmp_path / "straight", *LORA, *steps)
    out, trace = tmp_path / "stopped", tmp_path / "trace.jsonl"
    cmd = [sys.executable, "-m", "pipeline.train", "--pretrained_model_name_or_path", str(tiny_21_dir),
           "--train_data_meta_dir", str(meta21), "--output_dir", str(out), *TRAIN_BASE, *LORA, *steps,
           "--data_trace", str(trace)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (trace.is_file() and len(trace.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM after step" in stderr, stderr[-3000:]
    train(tiny_21_dir, meta21, out, *LORA, *steps, "--resume_from_checkpoint", "latest")
    name = "pytorch_lora_weights.safetensors"
    expected, got = load_file(str(tmp_path / "straight" / name)), load_file(str(out / name))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
