"""Tiny random configs of the real Hugging Face classes, built in the test (never downloaded).

Each builder returns a model in eval mode and a function that makes a batch for it with
padding, so tests exercise batch > 1, left padding and several grids the way real inputs do.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 96
PAD_ID = 0
LLAVA_IMAGE_ID = 95
QWEN_IMAGE_ID, QWEN_VISION_START, QWEN_VISION_END = 93, 94, 95


def tiny_llava(seed: int = 0, num_layers: int = 4, attn_implementation: str = "sdpa",
               image_size: int = 28, image_token_id: int = LLAVA_IMAGE_ID) -> LlavaForConditionalGeneration:
    """CLIP-vision (2 layers, 28 px by default, 14 px patches -> 2x2 grid) + Llama decoder."""
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD_ID, max_position_embeddings=128,
    )
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def llava_batch(rows: list[list[int]], images_per_row: list[int], seed: int = 0,
                image_size: int = 28) -> dict[str, torch.Tensor]:
    """Left-pad token rows (use `LLAVA_IMAGE_ID` x 4 per 28 px image) and add matching random pixels."""
    width = max(map(len, rows))
    input_ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(sum(images_per_row), 3, image_size, image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def image_tokens_llava() -> list[int]:
    return [LLAVA_IMAGE_ID] * 4


def tiny_qwen2_vl(seed: int = 0, num_layers: int = 3) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL vision (2 blocks, 14 px patches, 2x2 merge) + Qwen2 decoder with M-RoPE."""
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [1, 1, 2]}, pad_token_id=PAD_ID,
                         bos_token_id=1, eos_token_id=2),
        image_token_id=QWEN_IMAGE_ID, vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def qwen_batch(text_rows: list[list[int]], grids: list[tuple[int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """One image per row with patch grid (h, w) before the 2x2 merge; left-padded."""
    rows = []
    for text, (h, w) in zip(text_rows, grids):
        rows.append([QWEN_VISION_START] + [QWEN_IMAGE_ID] * (h * w // 4) + [QWEN_VISION_END] + text)
    width = max(map(len, rows))
    input_ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    generator = torch.Generator().manual_seed(seed)
    num_patches = sum(h * w for h, w in grids)
    pixel_values = torch.randn(num_patches, 3 * 2 * 14 * 14, generator=generator)
    image_grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    # What the processor returns beside input_ids: 1 marks image tokens (M-RoPE needs it).
    mm_token_type_ids = (input_ids == QWEN_IMAGE_ID).int()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw, "mm_token_type_ids": mm_token_type_ids}
