"""`wb inspect`: nearest-vocabulary reading of visual tokens, and the report on the default model."""

import json

import pytest
import torch

from workbench.inspection import nearest_vocabulary, spread_indices


def test_nearest_vocabulary_finds_planted_embeddings():
    embeddings = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    vectors = torch.stack([3.0 * embeddings[7], embeddings[42] + 0.01 * embeddings[3]])
    scores, ids = nearest_vocabulary(vectors, embeddings, top_k=3)
    assert ids[:, 0].tolist() == [7, 42]
    assert scores[0, 0].item() == pytest.approx(1.0, abs=1e-5)  # cosine ignores the scale
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


class WordsAndAddedTokens:
    """`vocab_size` and `len` as a Hugging Face tokenizer of 90 words and 2 added tokens reports them."""

    def __init__(self, added: int = 2):
        self.vocab_size, self.added = 90, added

    def __len__(self) -> int:
        return self.vocab_size + self.added


def test_non_text_rows_are_past_the_tokenizer_or_for_llava_past_the_base_vocabulary(llava, qwen):
    # Base rule (Qwen2-VL, 96 rows): only the rows no tokenizer entry maps to; added tokens are text.
    assert qwen.adapter.non_text_vocabulary_rows(WordsAndAddedTokens()).describe() == \
        "92-95 (rows no tokenizer entry maps to)"
    assert qwen.adapter.non_text_vocabulary_rows(WordsAndAddedTokens(added=6)).describe() == "none"
    # LLaVA (llava-hf conversions): every row from the base vocabulary on, added tokens included.
    rows = llava.adapter.non_text_vocabulary_rows(WordsAndAddedTokens())
    assert rows.rows == range(90, 96) and rows.describe().startswith("90-95 (appended after the base vocabulary")


def test_spread_indices_cover_the_grid():
    assert spread_indices(256, 5) == [0, 64, 128, 191, 255]
    assert spread_indices(3, 5) == [0, 1, 2]


def test_inspect_on_the_default_model(default_model, run_wb):
    code, out, _ = run_wb("inspect", "sample:coffee", "--json", "--max-new-tokens", "8", model=default_model)
    assert code == 0
    report = json.loads(out)
    assert report["num_visual_tokens"] == 256 and report["grid"] == [16, 16]
    assert [row["layer"] for row in report["layer_norms"]] == ["input"] + [str(i) for i in range(30)]
    assert all(row["visual"] > 0 and row["text"] > 0 for row in report["layer_norms"])
    assert len(report["nearest_tokens"]) == 5 and report["nearest_tokens"][-1]["row"] == 15
    assert report["answer"].strip()
    assert report["notes"] == default_model.notes  # e.g. the untrained-projector warning reaches the user
