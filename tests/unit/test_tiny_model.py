"""The tiny-model kit: diffusers loads it, it generates, its tokenizer behaves like Qwen's."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pipeline.families.qwen_edit import prompts, validation
from pipeline.families.qwen_edit import tiny as tiny_model

SPECIFIES = (
    "pipeline.families.qwen_edit.validation",
    "pipeline.families.qwen_edit.prompts",
    "pipeline.families.qwen_edit.tiny",
)


@pytest.fixture(scope="module")
def edit_pipe(tiny_model_dir):
    from diffusers import QwenImageEditPlusPipeline

    return QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir)


def test_layout_matches_qwen_image_edit_2509(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        assert (tiny_model_dir / sub).is_dir(), sub
    assert list((tiny_model_dir / "transformer").glob("*.safetensors"))


@pytest.mark.parametrize("num_images", [1, 2, 3])
def test_edit_plus_generates_from_images(edit_pipe, small_vae_inputs, num_images):
    images = [Image.new("RGB", (80 + 16 * i, 64), (40 * i, 120, 200)) for i in range(num_images)]
    out = edit_pipe(
        image=images,
        prompt="Make the sky red.",
        height=64,
        width=96,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert out.size == (96, 64)


def test_t2i_pipeline_from_same_components(edit_pipe):
    from diffusers import QwenImagePipeline

    parts = {k: v for k, v in edit_pipe.components.items() if k != "processor"}
    out = QwenImagePipeline(**parts)(
        prompt="A red circle.", height=48, width=80, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert out.size == (80, 48)


def test_special_token_ids_match_text_encoder_config(edit_pipe):
    tok, cfg = edit_pipe.tokenizer, edit_pipe.text_encoder.config
    ids = tiny_model.special_token_ids(tok)
    assert len(set(ids.values())) == len(ids)
    assert ids["<|image_pad|>"] == cfg.image_token_id
    assert ids["<|video_pad|>"] == cfg.video_token_id
    assert ids["<|vision_start|>"] == cfg.vision_start_token_id
    assert ids["<|vision_end|>"] == cfg.vision_end_token_id
    assert ids["<|im_end|>"] == cfg.text_config.eos_token_id
    assert max(ids.values()) < cfg.text_config.vocab_size
    # the real vocabulary's order is kept: consecutive ids from <|endoftext|>
    assert [ids[t] - ids["<|endoftext|>"] for t in tiny_model.QWEN_SPECIAL_TOKENS] == list(
        range(len(tiny_model.QWEN_SPECIAL_TOKENS))
    )
    for token in tiny_model.QWEN_SPECIAL_TOKENS:
        assert tok(token, add_special_tokens=False)["input_ids"] == [ids[token]], token


def test_chinese_round_trips(edit_pipe):
    text = "把天空改成日落，再加一只猫🐱。Mixed English 文本 123"
    ids = edit_pipe.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert edit_pipe.tokenizer.decode(ids) == text


def test_drop_index_is_computed_from_the_tokenizer(edit_pipe):
    # The tiny BPE keeps every template word whole, as Qwen2.5's does, so the
    # computed prefix lengths equal the real tokenizer's (and diffusers' constants).
    assert prompts.drop_indices(edit_pipe.tokenizer) == prompts.REAL_DROP_INDEX == {"edit": 64, "t2i": 34}
    assert edit_pipe.prompt_template_encode == prompts.EDIT_TEMPLATE
    assert edit_pipe.prompt_template_encode_start_idx == prompts.drop_index(edit_pipe.tokenizer, prompts.EDIT_TEMPLATE)
    # A coarser vocabulary splits words: the function follows the tokenizer.
    coarse = tiny_model.build_tokenizer(vocab_size=300)
    coarse_idx = prompts.drop_indices(coarse)
    assert coarse_idx["edit"] > 64 and coarse_idx["t2i"] > 34
    # and the prefix tokens are exactly the leading tokens of a full prompt
    full = coarse(prompts.edit_prompt_text("Make it red.", 1), add_special_tokens=False)["input_ids"]
    prefix = coarse(prompts.template_prefix(prompts.EDIT_TEMPLATE), add_special_tokens=False)["input_ids"]
    assert full[: coarse_idx["edit"]] == prefix


def test_real_tokenizer_values_are_enforced(edit_pipe, monkeypatch):
    monkeypatch.setattr(prompts, "REAL_IM_START_ID", edit_pipe.tokenizer.convert_tokens_to_ids("<|im_start|>"))
    assert prompts.drop_indices(edit_pipe.tokenizer) == {"edit": 64, "t2i": 34}
    monkeypatch.setattr(prompts, "REAL_DROP_INDEX", {"edit": 63, "t2i": 34})
    with pytest.raises(RuntimeError, match="differ from the real"):
        prompts.drop_indices(edit_pipe.tokenizer)


def test_processor_call_and_chat_template(edit_pipe):
    proc = edit_pipe.processor
    image = Image.new("RGB", (384, 384), "blue")
    text = prompts.edit_prompt_text("Make it red.", 1)
    batch = proc(text=[text], images=[image], return_tensors="pt")
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 28, 28]]  # 384 px -> 392 = 28 patches of 14 px
    image_pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == image_pad).sum()) == 28 * 28 // 4
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Swap them."}]},
    ]
    rendered = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "Swap them.<|im_end|>\n<|im_start|>assistant\n"
    )
    with_ids = proc.apply_chat_template(messages, add_generation_prompt=True, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in with_ids and "Picture 2: <|vision_start|>" in with_ids


def test_text_encoder_runs_vision_tower_and_mrope(edit_pipe):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen_vl

    encoder = edit_pipe.text_encoder
    assert isinstance(encoder.model.visual, qwen_vl.Qwen2_5_VisionTransformerPretrainedModel)
    assert encoder.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    proc = edit_pipe.processor
    text = prompts.edit_prompt_text("Make it red.", 1)
    red = proc(text=[text], images=[Image.new("RGB", (224, 224), "red")], return_tensors="pt")
    green = proc(text=[text], images=[Image.new("RGB", (224, 224), "green")], return_tensors="pt")
    with torch.no_grad():
        h_red = encoder(**red, output_hidden_states=True).hidden_states[-1]
        h_green = encoder(**green, output_hidden_states=True).hidden_states[-1]
    assert h_red.shape == (1, red["input_ids"].shape[1], tiny_model.TINY_TEXT_HIDDEN)
    # the image reaches the text states: prefix identical, image and later tokens differ
    drop = prompts.drop_index(proc.tokenizer, prompts.EDIT_TEMPLATE)
    assert torch.equal(h_red[:, :drop], h_green[:, :drop])
    assert not torch.allclose(h_red[:, drop:], h_green[:, drop:])


def test_the_validation_renderer_draws_from_stored_embeddings_and_restores_the_pipelines_vae_size(
    edit_pipe, tiny_model_dir
):
    """Validation renders from stored prompt embeddings with no text encoder; the edit pipeline's fixed VAE size is
    the training area only while a row renders."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    before = edit_plus.VAE_IMAGE_SIZE
    renderer = validation.Renderer(str(tiny_model_dir), edit_pipe.transformer, edit_pipe.vae, 64 * 64)
    width = edit_pipe.text_encoder.config.text_config.hidden_size
    embeds = {"positive": {"prompt_embeds": torch.zeros(5, width)}}
    generator = torch.Generator().manual_seed(0)
    image = renderer.render(embeds, [], 64, 64, 2, 1.0, generator, torch.device("cpu"))  # 1 step: NaN sigmas
    assert image.size == (64, 64) and len(set(image.getdata())) > 1, "a picture, not a constant (NaN) frame"
    with validation.source_area(123):
        assert edit_plus.VAE_IMAGE_SIZE == 123
    assert edit_plus.VAE_IMAGE_SIZE == before


def test_the_same_seed_writes_byte_identical_weights(tmp_path, tiny_model_dir):
    """The kit's promise (kit/tiny_model.py): seeded, so CI and every test session build the same model."""
    from pipeline.kit.tiny_model import make_tiny_model

    again = make_tiny_model(tmp_path / "again", seed=0)
    for weights in sorted(tiny_model_dir.rglob("*.safetensors")):
        assert weights.read_bytes() == (again / weights.relative_to(tiny_model_dir)).read_bytes(), weights.name
