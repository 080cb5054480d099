"""Qwen-Image 2.1 (``pipeline/families/qwen_image21/``), checked against diffusers' ``QwenImage21Pipeline`` on the
tiny random model: the prompt embeddings equal the pipeline's own encode path bit for bit (CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.families.qwen_image21 import tiny, validation
from pipeline.families.qwen_image21.encoder import (
    ConditionTooSmall,
    PromptBuilder,
    PromptEncoder,
    condition_size,
    slot_layout,
)

RESOLUTION = 384  # small conditions keep the tiny model's forwards quick

SPECIFIES = (
    "pipeline.families.qwen_image21.tiny",
    "pipeline.families.qwen_image21.validation",
    "pipeline.families.qwen_image21.encoder",
    "pipeline.families.qwen_image21.forward",
)


@pytest.fixture(scope="module")
def parts(tiny_21_dir):
    from diffusers import QwenImage21Pipeline

    pipe = QwenImage21Pipeline.from_pretrained(tiny_21_dir)
    return pipe, PromptBuilder(tiny_21_dir, RESOLUTION), PromptEncoder(tiny_21_dir, "cpu", "float32")


def pictures() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    transparent = rng.integers(0, 255, (300, 400, 4), dtype=np.uint8)
    transparent[..., 3] = rng.integers(0, 2, (300, 400)) * 255  # holes the VLM must see as white
    return {
        "rgba": Image.fromarray(transparent, "RGBA"),
        "tall": Image.fromarray(rng.integers(0, 255, (500, 350, 3), dtype=np.uint8)),
        "wide": Image.fromarray(rng.integers(0, 255, (200, 420, 3), dtype=np.uint8)),
    }


def pipeline_conditions(pipe, images: list[Image.Image]) -> list[Image.Image]:
    """What ``QwenImage21Pipeline.__call__`` hands its encoder: each condition as RGBA, resized once."""
    out = []
    for img in images:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        width, height = condition_size(*rgba.size, RESOLUTION)
        out.append(pipe.image_processor.resize(rgba, width=width, height=height))
    return out


@pytest.mark.parametrize(
    "names, text",
    [((), "A cat on a windowsill."), ((), ""), (("rgba",), "Make it blue."), (("tall", "rgba"), ""),
     (("tall", "rgba", "wide"), "Merge them into one scene.")],
)  # fmt: skip
def test_embeddings_equal_the_pipelines_bit_for_bit(parts, names, text):
    pipe, builder, encoder = parts
    images = [pictures()[n] for n in names]
    assert builder.drop_index == {"edit": pipe._drop_idx, "t2i": pipe._drop_idx}, "from the chat template"
    if images:
        conditions = builder.condition_images(images)
        expected = pipeline_conditions(pipe, images)
        assert [np.asarray(c).tolist() for c in conditions] == [np.asarray(c).tolist() for c in expected]
        assert all(c.mode == "RGBA" for c in conditions), "alpha kept for the VAE"
        reference, _, pad_mask = pipe._get_qwen_prompt_embeds([text], conditions, device="cpu")
        inputs = builder.edit(conditions, text)
    else:
        reference, _, pad_mask = pipe._get_qwen_prompt_embeds([text], None, device="cpu")
        inputs = builder.t2i(text)
    ours = encoder.encode([inputs], builder.drop_index)[0]
    assert torch.equal(ours, reference[0])
    slots = slot_layout(inputs.input_ids, builder.drop_index[inputs.kind], builder.image_pad_id)
    mask = torch.zeros(ours.shape[0], dtype=torch.bool)
    for position, count in slots:
        mask[position : position + count] = True
    assert torch.equal(mask, pad_mask[0]) and len(slots) == len(images)
    for (_, count), condition in zip(slots, conditions if images else [], strict=True):
        assert count == (condition.width // 32) * (condition.height // 32), "one slot per 32×32 pixels"


def test_a_batch_of_equal_length_prompts_equals_one_at_a_time(parts):
    pipe, builder, encoder = parts
    conditions = builder.condition_images([pictures()["tall"]])
    first, second = builder.edit(conditions, "Make it red."), builder.edit(conditions, "Make it blue.")
    assert first.length == second.length
    together = encoder.encode([first, second], builder.drop_index)
    assert all(
        torch.equal(a, encoder.encode([p], builder.drop_index)[0])
        for a, p in zip(together, [first, second], strict=True)
    )


def test_the_embedding_is_the_pre_norm_state_and_the_hook_is_removed(parts):
    _, builder, encoder = parts
    inputs = builder.t2i("A cat.")
    pre = encoder.encode([inputs], builder.drop_index)[0]
    text_model = encoder.model.model.language_model
    assert not text_model.norm._forward_hooks, "the hook is removed after the call"
    post = encoder.model.model(input_ids=inputs.input_ids[None]).last_hidden_state[0, builder.drop_index["t2i"] :]
    assert not torch.allclose(pre, post), "the post-norm state (2509's) is not what 2.1 stores"


def test_a_condition_the_processor_would_resize_again_is_refused(parts):
    _, builder, _ = parts
    small = PromptBuilder.__new__(PromptBuilder)
    small.__dict__.update(builder.__dict__, condition_resolution=256)
    with pytest.raises(ConditionTooSmall, match="outside the processor's 65536"):
        small.condition_images([Image.new("RGB", (400, 300))])  # 288×224 = 64,512 pixels at 256²


def test_stored_rows_and_slots_give_back_the_prompt_and_the_forward_equals_the_pipelines_call(parts):
    """A v2 sample stores the text rows and the slot layout; rebuilt, the transformer's prediction for the target
    equals the pipeline's own call (conditions first, target last, target slots appended, the last rows) bitwise."""
    from pipeline.families.qwen_image21 import forward

    pipe, builder, _ = parts
    conditions = builder.condition_images([pictures()["rgba"], pictures()["tall"]])
    text = "Make it blue."
    embeds, _, pad_mask = pipe._get_qwen_prompt_embeds([text], conditions, device="cpu")
    runs = slot_layout(builder.edit(conditions, text).input_ids, builder.drop_index["edit"], builder.image_pad_id)
    slots = [[position, c.height // 32, c.width // 32] for (position, _), c in zip(runs, conditions, strict=True)]
    full, mask = forward.full_prompt(forward.text_rows(embeds[0], pad_mask[0]), slots)
    assert torch.equal(mask, pad_mask[0]) and torch.equal(full[~mask], embeds[0][~pad_mask[0]])

    generator = torch.Generator().manual_seed(0)
    vae_inputs = [pipe.image_processor.preprocess(c, width=c.width, height=c.height).unsqueeze(2) for c in conditions]
    height, width = 320, 448
    noisy, packed_conditions = pipe.prepare_latents(vae_inputs, 1, 64, height, width, torch.float32, "cpu", generator)
    timestep = torch.tensor([0.7])
    shapes = [[*[(1, c.height // 16, c.width // 16) for c in conditions], (1, height // 16, width // 16)]]
    img_mask = torch.cat([pad_mask, pad_mask.new_ones(1, noisy.shape[1] // 4)], 1)
    expected = pipe.transformer(
        hidden_states=torch.cat([packed_conditions, noisy], 1), timestep=timestep, encoder_hidden_states=embeds,
        encoder_hidden_states_mask=None, img_shapes=shapes, img_mask=img_mask, return_dict=False,
    )[0][:, -noisy.shape[1] :]  # fmt: skip
    sources = [pipe._encode_vae_image(v, generator)[:, :, 0] for v in vae_inputs]
    target = torch.zeros(1, 64, height // 16, width // 16)
    batch = {"prompt_embeds": full[None], "image_pad_mask": mask[None]}
    got = forward.predict(pipe.transformer, noisy, target, sources, batch, timestep, torch.device("cpu"), torch.float32)
    assert torch.equal(got, expected)
    assert torch.equal(forward.pack_latents(sources[0]), packed_conditions[:, : sources[0][0, 0].numel()])


@pytest.mark.parametrize("names", [(), ("rgba",)])
def test_the_validation_render_from_stored_embeddings_equals_the_pipelines_prompt_path(parts, tiny_21_dir, names):
    """No text encoder in the training process: the renderer hands the pipeline the stored prompt (embeddings and
    slot mask); its image equals the pipeline's own from the prompt text and the same conditions."""
    from pipeline.families import get

    pipe, _, encoder = parts
    family = get("qwen_image21")
    images = [pictures()[n] for n in names]
    builder = PromptBuilder(tiny_21_dir, family.validation_resolution(64 * 64))
    conditions = builder.condition_images(images) if images else []
    embeds = {}
    for which, text in (("positive", "Make it blue."), ("negative", family.validation_negative_prompt)):
        inputs = builder.edit(conditions, text) if images else builder.t2i(text)
        rows, entry = family.stored_embedding(encoder.encode([inputs], builder.drop_index)[0], inputs)
        embeds[which] = family.prompt_from_sample(rows, entry)
    renderer = family.validation_renderer(str(tiny_21_dir), pipe.transformer, pipe.vae, 64 * 64)
    assert isinstance(renderer, validation.Renderer)
    got = renderer.render(embeds, images, 256, 256, 2, 1.0, torch.Generator().manual_seed(5), torch.device("cpu"))
    kwargs = {"image": images} if images else {"height": 256, "width": 256}
    expected = pipe(prompt="Make it blue.", num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                    output_resolution=builder.condition_resolution, **kwargs).images[0]  # fmt: skip
    flat = Image.new("RGB", expected.size, (255, 255, 255))
    flat.paste(expected, mask=expected.getchannel("A"))
    assert np.array_equal(np.asarray(got), np.asarray(flat))


def test_padded_batches_stay_within_a_few_bf16_ulps_of_one_prompt_at_a_time(parts):
    """``--batching padded``: prompts of different lengths share a forward, padded on the left as the pipeline
    pads. Stored in bf16, each must stay within 4 bf16 ulps (2⁻⁸ relative each) of its one-prompt result, the bound
    documented for 2509's padded batching."""
    _, builder, encoder = parts
    conditions = builder.condition_images([pictures()["tall"]])
    prompts = [builder.edit(conditions, "Make it red."), builder.edit(conditions, "Merge the two characters into one.")]
    assert prompts[0].length != prompts[1].length
    together = encoder.encode(prompts, builder.drop_index)
    for batched, prompt in zip(together, prompts, strict=True):
        alone = encoder.encode([prompt], builder.drop_index)[0]
        a, b = batched.to(torch.bfloat16).float(), alone.to(torch.bfloat16).float()
        ulp = torch.finfo(torch.bfloat16).eps * b.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
        assert bool(((a - b).abs() <= 4 * ulp).all())


def test_the_text_limit_follows_the_21_rope():
    from pipeline.families import get

    family = get("qwen_image21")
    # 8192 frame positions; each image advances the frame by max(h, w) latent tokens (16 px each)
    assert family.text_positions([(1024, 1024), (1024, 768)]) == 8192 - 64 - 64
    assert family.text_positions([(512, 2048)]) == 8192 - 128


def test_the_tiny_model_is_a_qwen_image21_folder_of_its_declared_sizes(tiny_21_dir):
    """The tiny 2.1 model (tiny.py) is what the family detects, with the widths its config functions declare."""
    import json

    from pipeline.families import detect

    assert detect(str(tiny_21_dir)).name == "qwen_image21"
    written = json.loads((tiny_21_dir / "transformer" / "config.json").read_text())
    declared = json.loads(json.dumps(tiny.transformer_config()))  # tuples as JSON writes them
    assert {k: written[k] for k in declared} == declared
    assert written["context_in_dim"] == tiny.TEXT_HIDDEN


def test_the_family_is_registered_under_its_name_with_batches_of_one():
    from pipeline.families import get
    from pipeline.families.qwen_image21 import QwenImage21

    family = get("qwen_image21")
    assert isinstance(family, QwenImage21) and family.max_batch_size == 1 and family.fixed_conditions
