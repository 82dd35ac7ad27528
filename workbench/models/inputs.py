"""Turn (image, prompt) pairs into a model batch, with the image placeholder where the model expects it.

A prompt that already contains the processor's image token is used as written; otherwise
the processor's chat template wraps it as a user turn with one image. Batches are left-padded
so that generation continues every row from its last real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workbench.errors import InputError
from workbench.prompts import check_prompt_text

if TYPE_CHECKING:  # transformers takes seconds to import; the prompt checks here must not wait for it
    from PIL import Image
    from transformers import BatchFeature


def image_placeholder(processor: Any) -> str:
    token = getattr(processor, "image_token", None)
    if token is None:
        raise InputError(f"processor {type(processor).__name__} declares no image token; it cannot take images")
    return token


def check_fits_context(inputs: BatchFeature, context_length: int | None, new_tokens: int = 0) -> None:
    """Refuse, before any forward pass, a batch whose prompt and answer would not fit the model's context."""
    length = inputs["input_ids"].shape[1]
    if context_length is not None and length + new_tokens > context_length:
        answer = f" and {new_tokens:,} answer tokens" if new_tokens else ""
        raise InputError(f"the prompt with its image is {length:,} tokens{answer}; the model's context is "
                         f"{context_length:,} tokens: shorten the prompt")


def format_prompt(processor: Any, prompt: str) -> str:
    """The text the processor should see for one image and one prompt."""
    check_prompt_text(prompt)
    placeholder = image_placeholder(processor)
    if placeholder in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raise InputError(
        f"prompt has no image placeholder {placeholder!r} and the processor has no chat template to add one; "
        f"put {placeholder} in the prompt where the image belongs"
    )


def build_inputs(
    processor: Any, images: Sequence[Image.Image], prompts: Sequence[str], device: Any = "cpu"
) -> BatchFeature:
    """One batch of one image per prompt, left-padded, moved to `device`."""
    if len(images) != len(prompts):
        raise InputError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
    texts = [format_prompt(processor, prompt) for prompt in prompts]
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        # One list per prompt: processors that group images by prompt (Gemma 3's) take a flat list as one prompt's.
        batch = processor(images=[[image] for image in images], text=texts, return_tensors="pt", padding=True)
    except ValueError as error:
        raise InputError(f"the processor rejected the batch: {str(error).splitlines()[0]}") from None
    finally:
        tokenizer.padding_side = padding_side
    return batch.to(device)
