"""SkipGPT's text: the Python reference manual's topics (`pydoc_data.topics`, ~65k words, ships with Python).

The 79 topics are split by a seeded shuffle into train and test topics, so no test paragraph has a neighbour in
train; each split is tokenized as one stream (topics joined by the end-of-text token) and cut into blocks of
`block_size` tokens for training and perplexity.
"""

from __future__ import annotations

import random

import torch
from pydoc_data.topics import topics
from transformers import PreTrainedTokenizerBase

TEST_SHARE = 0.2


def topic_split(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, test) topic names: a seeded shuffle of the sorted names, the last `TEST_SHARE` for test."""
    names = sorted(topics)
    random.Random(seed).shuffle(names)
    cut = round(len(names) * (1 - TEST_SHARE))
    return sorted(names[:cut]), sorted(names[cut:])


def text_blocks(tokenizer: PreTrainedTokenizerBase, split: str, block_size: int, seed: int = 0) -> torch.Tensor:
    """(blocks, block_size) token ids of `split` ("train" or "test"); the tail shorter than a block is dropped."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    names = topic_split(seed)[split == "test"]
    separator = tokenizer.eos_token or "\n\n"
    ids = tokenizer(separator.join(topics[name] for name in names), return_tensors="pt").input_ids[0]
    blocks = len(ids) // block_size
    return ids[: blocks * block_size].view(blocks, block_size)
