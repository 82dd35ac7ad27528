"""Streaming evaluation on a tiny trained run: per-word delays, BLEU/AL/LAAL rows, the written table and plot."""

import json
from pathlib import Path
from statistics import mean

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from efficient_models.streaming.config import StreamingConfig
from efficient_models.streaming.eval_command import parse_wait_ks
from efficient_models.streaming.evaluation import (
    LAYOUT_NAMES, DecoderCost, Translation, compute_by_source_length, evaluate, word_delays,
)
from efficient_models.streaming.streams import LAYOUTS
from efficient_models.streaming.task import make_splits
from efficient_models.streaming.training import DEFAULT_RECIPE, load_recipe, smoke_recipe, train_streaming
from tests.test_streaming_chat_format import tiny_tokenizer
from workbench.errors import InputError
from workbench.flops import DecoderShape


def test_a_words_delay_is_that_of_its_first_token():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("mon arbre noir.", add_special_tokens=False)["input_ids"]
    token_delays = list(range(1, len(ids) + 1))
    text, delays = word_delays(tokenizer, ids, token_delays)
    assert text == "mon arbre noir."
    starts = [index for index in range(len(ids))
              if index == 0 or tokenizer.convert_ids_to_tokens(ids[index]).startswith("Ġ")]
    assert delays == [token_delays[index] for index in starts] and len(delays) == 3


def test_wait_k_lists_are_checked():
    assert parse_wait_ks("1,3, 5") == [1, 3, 5]
    for bad in ("a", "0,2", ""):
        with pytest.raises(InputError):
            parse_wait_ks(bad)


def base_model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)).eval()


def train_tiny_run(run: Path, layout: str = "group") -> Path:
    """A 2-step run of a tiny LM saved as a local model folder (worker processes load it from there)."""
    tokenizer = tiny_tokenizer()
    base = run.parent / "base-model"
    if not base.is_dir():
        base_model(len(tokenizer)).save_pretrained(base)
        tokenizer.save_pretrained(base)
    recipe = smoke_recipe(load_recipe(DEFAULT_RECIPE), steps=2)
    recipe = recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"rank": 2, "alpha": 4})})
    config = StreamingConfig(model=str(base), wait_k=2, max_lag_words=2, max_tokens_per_write=4,
                             training_layout=layout)
    train_streaming(config, recipe, run, base_model(len(tokenizer)), tokenizer, resume=False)
    return run


@pytest.fixture
def tiny_run(tmp_path):
    return train_tiny_run(tmp_path / "run")


def test_eval_writes_bleu_al_laal_for_each_policy(tiny_run, tmp_path, run_wb):
    out = tmp_path / "eval"
    code, _, err = run_wb("eval", "streaming", "--run", str(tiny_run), "--wait-k", "1,3", "--layouts", "group",
                          "--n", "2", "--out", str(out))
    assert code in (None, 0), err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["policy"] for row in rows] == ["wait-1", "wait-3", "offline"]
    _, test = make_splits(seed=0, train_size=0)
    offline = rows[-1]
    # Offline, every word waits for the whole source: AL is the mean source length.
    assert offline["AL"] == pytest.approx(mean(len(pair.source_words) for pair in test[:2]))
    for row in rows:
        assert 0 <= row["BLEU"] <= 100 and row["LAAL"] >= row["AL"] - 1e-9
    assert rows[0]["AL"] < offline["AL"]
    assert (out / "table.md").read_text().count("\n") == 2 + 3
    assert "plotly" in (out / "bleu_laal.html").read_text()
    assert (out / "compute.html").read_text().count('"name":') == 3  # a curve per policy


def test_each_run_is_decoded_as_it_was_trained_in_one_table(tiny_run, tmp_path, run_wb):
    batch_run = train_tiny_run(tmp_path / "batch", layout="batch")
    tables = {}
    for jobs in (1, 2):
        out = tmp_path / f"eval-{jobs}"
        code, _, err = run_wb("eval", "streaming", "--run", str(tiny_run), "--run", str(batch_run), "--wait-k",
                              "1,2", "--no-offline", "--n", "2", "--jobs", str(jobs), "--out", str(out))
        assert code in (None, 0), err
        tables[jobs] = json.loads((out / "results.json").read_text())
    results = tables[1]
    assert [(row["method"], row["policy"]) for row in results["rows"]] == [
        ("group positions, group-trained wait-2", "wait-1"), ("group positions, group-trained wait-2", "wait-2"),
        ("re-encoding, batch-trained", "wait-1"), ("re-encoding, batch-trained", "wait-2")]
    assert [run["training_layout"] for run in results["runs"]] == ["group", "batch"]
    assert (tmp_path / "eval-1" / "bleu_laal.html").read_text().count('"name":') == 2  # a curve per method
    # Worker processes give the same rows, in the same order.
    assert tables[2] == results


def test_eval_refuses_a_folder_that_is_not_a_run(tmp_path, run_wb):
    code, _, err = run_wb("eval", "streaming", "--run", str(tmp_path), "--out", str(tmp_path / "eval"))
    assert code == 2 and "wb train streaming" in err and len(err.strip().splitlines()) == 1


def test_compute_is_binned_by_source_length():
    def made(words, generated, forward, pairs=0):
        return Translation("x", [1], words, "y", generated, forward, pairs)

    cost = DecoderCost(DecoderShape(hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4), layers=2)
    per_token = cost.flops(1, 0) / 1e9  # linear in the tokens
    bins = compute_by_source_length([made(3, 10, 20), made(9, 10, 40), made(12, 5, 50)], cost)
    assert bins == pytest.approx({"1-10": 3.0 * per_token, "11-20": 10.0 * per_token})
    # Attention adds 2 layers x 4 FLOPs per pair and head dimension.
    with_pairs = cost.gflops_per_token([made(3, 1, 1, pairs=10)]) - per_token
    assert with_pairs * 1e9 == pytest.approx(2 * 4 * 10 * 2 * 4)


def test_reencoding_costs_more_per_token_than_group_positions():
    tokenizer = tiny_tokenizer()
    config = StreamingConfig(max_tokens_per_write=4, max_lag_words=1)
    _, test = make_splits(seed=0, train_size=0)
    rows = evaluate(base_model(len(tokenizer)), tokenizer, config, test[:2], [1], ["group", "reencode"])
    group, reencoded = rows
    assert (group["method"], reencoded["method"]) == ("group positions", "re-encoding")
    assert reencoded["forward_tokens_per_token"] > 2 * group["forward_tokens_per_token"]
    assert reencoded["GFLOPs_per_token"] > 2 * group["GFLOPs_per_token"]
    assert set(LAYOUT_NAMES) == set(LAYOUTS)  # every decoding layout has a name in the table
    with pytest.raises(InputError, match="unknown layout"):
        evaluate(base_model(len(tokenizer)), tokenizer, config, test[:1], [1], ["sideways"])
