"""Prompt templates and the drop index, in one place.

The templates are the ones diffusers' Qwen-Image pipelines use at inference, so
embeddings made for training condition the model exactly as inference does.
The drop index (how many leading tokens of the encoder output belong to the
template's system prefix) is computed from the tokenizer, never hard-coded.
"""

from __future__ import annotations

# diffusers QwenImageEditPlusPipeline.prompt_template_encode
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)

# diffusers QwenImagePipeline.prompt_template_encode (text-to-image)
T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# What Edit-Plus puts before the instruction for the i-th (1-based) image.
PICTURE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"

# Drop indices with the real Qwen2.5 tokenizer (diffusers hard-codes these).
REAL_DROP_INDEX = {"edit": 64, "t2i": 34}
# Id of <|im_start|> in the real Qwen2.5 vocabulary: how the real tokenizer is recognised.
REAL_IM_START_ID = 151644


def template_prefix(template: str) -> str:
    """The part of ``template`` before the user's text."""
    return template.split("{}", 1)[0]


def drop_index(tokenizer, template: str) -> int:
    """Number of tokens of the template's system prefix for ``tokenizer``."""
    return len(tokenizer(template_prefix(template), add_special_tokens=False)["input_ids"])


def is_real_qwen_tokenizer(tokenizer) -> bool:
    """True for the published Qwen2.5 vocabulary (special tokens at their real ids)."""
    return tokenizer.convert_tokens_to_ids("<|im_start|>") == REAL_IM_START_ID


def drop_indices(tokenizer) -> dict[str, int]:
    """Drop indices for the edit and T2I templates, checked against the known values on the real tokenizer."""
    found = {"edit": drop_index(tokenizer, EDIT_TEMPLATE), "t2i": drop_index(tokenizer, T2I_TEMPLATE)}
    if is_real_qwen_tokenizer(tokenizer) and found != REAL_DROP_INDEX:
        raise RuntimeError(f"template prefix lengths {found} differ from the real Qwen2.5 values {REAL_DROP_INDEX}")
    return found


def edit_prompt_text(instruction: str, num_images: int) -> str:
    """The full Edit-Plus prompt for ``num_images`` images, as diffusers builds it."""
    pictures = "".join(PICTURE_PROMPT.format(i + 1) for i in range(num_images))
    return EDIT_TEMPLATE.format(pictures + instruction)


def t2i_prompt_text(instruction: str) -> str:
    """The full text-to-image prompt."""
    return T2I_TEMPLATE.format(instruction)


# System text of the edit template, for chat-template ("firered") prompts.
EDIT_SYSTEM = EDIT_TEMPLATE.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]

PROMPT_STYLES = ("diffusers", "firered")


def firered_messages(instruction: str, num_images: int) -> list[dict]:
    """The original tool's chat messages: images first, no ``Picture i:`` labels."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": instruction}]
    return [{"role": "system", "content": EDIT_SYSTEM}, {"role": "user", "content": content}]
