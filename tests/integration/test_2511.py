"""Qwen-Image-Edit-2511 (``zero_cond_t``): diffusers modulates the source images' tokens as at t = 0, telling them from
the target's by the image shapes it is given. Training must hand the transformer the same split inference does."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import generate_edit, train, transformer_weights

pytestmark = pytest.mark.slow


class ModulationSpy:
    """Records, for every transformer forward, its image-token input and the index each block modulates by."""

    def __init__(self, transformer):
        self.calls: list[dict] = []
        transformer.register_forward_pre_hook(self.forward_input, with_kwargs=True)
        transformer.transformer_blocks[0].register_forward_pre_hook(self.block_input, with_kwargs=True)

    def forward_input(self, module, args, kwargs):
        self.calls.append({"hidden": kwargs["hidden_states"].detach().clone(), "shapes": kwargs["img_shapes"]})

    def block_input(self, module, args, kwargs):
        self.calls[-1]["index"] = kwargs["modulate_index"].detach().clone()


def source_sizes(count: int) -> list[tuple[int, int]]:
    return [(64, 64), (96, 64), (64, 128)][:count]  # (width, height): mixed sizes, one per source position


@pytest.mark.parametrize("sources", [1, 2, 3])
def test_training_hands_the_transformer_the_target_source_split_inference_does(tiny_2511_dir, sources, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    from pipeline.families.qwen_edit import forward
    from pipeline.train.config.model import FlowConfig
    from pipeline.train.engine import flow
    from pipeline.train.engine.model import load_scheduler, load_transformer, load_vae
    from pipeline.train.engine.step import batch_loss

    transformer = load_transformer(str(tiny_2511_dir))
    assert transformer.config.zero_cond_t
    vae, scheduler = load_vae(str(tiny_2511_dir)), load_scheduler(str(tiny_2511_dir))
    spy = ModulationSpy(transformer)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "target": torch.randint(0, 256, (2, 3, 64, 96), generator=generator, dtype=torch.uint8),
        "sources": [
            torch.randint(0, 256, (2, 3, h, w), generator=generator, dtype=torch.uint8)
            for w, h in source_sizes(sources)
        ],  # fmt: skip
        "prompt_embeds": torch.randn(2, 7, transformer.config.joint_attention_dim, generator=generator),
        "prompt_mask": torch.ones(2, 7, dtype=torch.long),
    }
    cfg = FlowConfig()
    batch_loss(batch, transformer, vae, scheduler, cfg, rank=0, world=1, loader_step=0)
    (call,) = spy.calls
    packed = [forward.pack_latents(flow.encode_latents(vae, s, cfg.vae_mini_batch)) for s in batch["sources"]]
    target_tokens = call["hidden"].shape[1] - sum(p.shape[1] for p in packed)
    index = call["index"]
    assert index.shape == call["hidden"].shape[:2]
    assert (index[:, :target_tokens] == 0).all(), "the noisy target is modulated by the step's timestep"
    assert (index[:, target_tokens:] == 1).all(), "every source token is modulated as at t = 0"
    assert torch.equal(call["hidden"][:, target_tokens:], torch.cat(packed, dim=1).to(call["hidden"].dtype)), (
        "the tokens modulated as at t = 0 are exactly the source images' latents, in source order"
    )

    # inference: the pipeline's own split, by content: the condition tokens stay the same across denoising steps
    # the pipeline resizes each source to this area for the VAE (1024² by default: minutes on a CPU); at 96² the three
    # sources still reach the transformer in three different shapes (96×96, 128×64, 64×128), as checked below
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", 96 * 96)
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(tiny_2511_dir), transformer=transformer)
    spy.calls.clear()
    images = [Image.new("RGB", size, (40 * k, 90, 200)) for k, size in enumerate(source_sizes(sources))]
    pipe(image=images, prompt="Make it blue.", height=64, width=96, num_inference_steps=2,
         generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    first, second = (c for c in spy.calls if c["hidden"].shape[0] == 1)  # the conditional pass of each step
    for call in (first, second):
        shapes = call["shapes"][0]
        assert len(shapes) == 1 + sources and len(set(map(tuple, shapes[1:]))) == sources, shapes  # mixed sizes
        target = shapes[0][0] * shapes[0][1] * shapes[0][2]
        assert (call["index"][:, :target] == 0).all() and (call["index"][:, target:] == 1).all()
    moved = (first["hidden"] != second["hidden"]).any(dim=-1)[0]
    assert moved[:target].all() and not moved[target:].any(), "index 1 exactly where the pipeline's condition is"


def test_2511_trains_lora_and_full_exports_and_its_pipeline_loads_them(
    tiny_2511_dir, edit_meta, tmp_path, small_vae_inputs
):
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    common = ["--max_train_steps", "2", "--learning_rate", "5e-3"]
    full = tmp_path / "full"
    train(tiny_2511_dir, edit_meta, full, *common)
    exported = QwenImageTransformer2DModel.from_pretrained(full / "transformer")
    assert exported.config.zero_cond_t, "the export keeps the 2511 config"
    base = transformer_weights(tiny_2511_dir / "transformer")
    trained = transformer_weights(full / "transformer")
    assert any(not torch.equal(base[k], trained[k]) for k in base), "full fine-tuning changed the weights"
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(tiny_2511_dir), transformer=exported)
    full_image = generate_edit(pipe)

    lora = tmp_path / "lora"
    train(tiny_2511_dir, edit_meta, lora, *common, "--use_peft_lora", "--lora_r", "4")
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(tiny_2511_dir))
    plain = generate_edit(pipe)
    pipe.load_lora_weights(str(lora / "pytorch_lora_weights.safetensors"))
    with_lora = generate_edit(pipe)
    assert full_image.shape == plain.shape == with_lora.shape
    assert not (plain == with_lora).all(), "the LoRA trained on 2511 changes its pipeline's output"
    config = json.loads((full / "transformer" / "config.json").read_text())
    assert config["zero_cond_t"] is True
