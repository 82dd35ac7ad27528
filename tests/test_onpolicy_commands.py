"""`wb train reasoner`, `wb train onpolicy-sft` and `wb eval reasoning` end to end on a tiny saved model;
bad inputs are one line. The shipped configs validate."""

import json

import yaml

from efficient_models.onpolicy_sft.commands import (
    DEFAULT_GRPO,
    DEFAULT_ONPOLICY,
    DEFAULT_REASONER,
)
from efficient_models.onpolicy_sft.comparison import COLUMNS
from efficient_models.onpolicy_sft.config import OnPolicySFTConfig, ReasonerConfig
from efficient_models.onpolicy_sft.models import save_causal_lm
from efficient_models.registry import load_config
from tests.test_onpolicy_sampling import char_tokenizer, tiny_lm

OPTIMISATION = {"steps": 2, "learning_rate": 1e-3, "warmup_steps": 0, "final_learning_rate_ratio": 1.0,
                "weight_decay": 0.0, "max_grad_norm": 1.0, "checkpoint_every": 10, "precision": "fp32"}


def _saved_tiny_model(folder):
    save_causal_lm(tiny_lm(), char_tokenizer(), folder)  # as a run folder: the model sits in folder/model
    return folder


def test_the_shipped_configs_validate():
    assert isinstance(load_config(DEFAULT_REASONER), ReasonerConfig)
    onpolicy = load_config(DEFAULT_ONPOLICY)
    assert isinstance(onpolicy, OnPolicySFTConfig) and onpolicy.model == "runs/train-reasoner"
    assert onpolicy.budget_end < onpolicy.budget_start <= onpolicy.max_new_tokens


def test_reasoner_then_onpolicy_then_eval(tmp_path, run_wb):
    start = _saved_tiny_model(tmp_path / "start")
    reasoner_config = tmp_path / "reasoner.yaml"
    reasoner_config.write_text(yaml.safe_dump({"method": "reasoner", "model": str(start), "train_problems": 4,
                                               "task": {"min_events": 1, "max_events": 1}, "rows_per_step": 2,
                                               "rows_per_micro_batch": 2, "optimisation": OPTIMISATION}))
    code, out, err = run_wb("train", "reasoner", "--config", str(reasoner_config), "--out", str(tmp_path / "r"))
    assert code in (None, 0), err
    assert "2 steps" in out and (tmp_path / "r" / "model" / "config.json").is_file()

    onpolicy_config = tmp_path / "onpolicy.yaml"
    onpolicy_config.write_text(yaml.safe_dump({
        "method": "onpolicy-sft", "model": str(tmp_path / "r"), "prompts_per_step": 2, "samples_per_prompt": 2,
        "max_new_tokens": 8, "budget_start": 8, "rows_per_micro_batch": 2, "optimisation": OPTIMISATION}))
    code, out, err = run_wb("train", "onpolicy-sft", "--config", str(onpolicy_config), "--out", str(tmp_path / "o"),
                            "--steps", "1")
    assert code in (None, 0), err
    assert "1 steps" in out and len((tmp_path / "o" / "steps.jsonl").read_text().splitlines()) == 1

    code, _, err = run_wb("eval", "reasoning", "--model", str(tmp_path / "r"), "--model", str(tmp_path / "o"),
                          "--problems", "2", "--samples", "2", "--k", "1", "--k", "2", "--max-new-tokens", "6",
                          "--out", str(tmp_path / "eval"))
    assert code in (None, 0), err
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [entry["model"] for entry in results] == [str(tmp_path / "r"), str(tmp_path / "o")]
    for metrics in results:
        assert metrics["problems"] == 2 and 0 <= metrics["pass@1"] <= metrics["pass@2"] <= 1
        assert metrics["mean_tokens"] <= 6
    # Against the first model, with what each run recorded of its training cost.
    assert results[0]["accuracy_change"] == 0 and results[0]["length_ratio"] == 1
    assert results[1]["length_ratio"] == round(results[1]["mean_tokens"] / results[0]["mean_tokens"], 3)
    onpolicy_metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert results[1]["train_peak_memory_mb"] == onpolicy_metrics["peak_memory_mb"] > 0
    assert results[0]["train_seconds_per_step"] == json.loads((tmp_path / "r" / "metrics.json").read_text())[
        "seconds_per_step"]
    table = (tmp_path / "eval" / "table.md").read_text().splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS) + " |" and len(table) == 2 + len(results)
    assert "Pareto frontier" in (tmp_path / "eval" / "pareto.html").read_text()


def test_bad_inputs_are_one_line(tmp_path, run_wb):
    code, _, err = run_wb("train", "onpolicy-sft", "--config", str(DEFAULT_REASONER), "--out", str(tmp_path / "x"))
    assert code == 2 and "is a 'reasoner' config" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_wb("train", "onpolicy-sft", "--config", str(DEFAULT_GRPO), "--out", str(tmp_path / "x"))
    assert code == 2 and "is a 'grpo-length' config" in err
    code, _, err = run_wb("train", "grpo-length", "--config", str(DEFAULT_ONPOLICY), "--out", str(tmp_path / "x"))
    assert code == 2 and "is a 'onpolicy-sft' config" in err
    code, _, err = run_wb("train", "reasoner", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y"))
    assert code == 2 and "neither 'default'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_wb("eval", "reasoning", "--samples", "2", "--k", "4", "--out", str(tmp_path / "z"))
    assert code == 2 and "above --samples" in err and len(err.strip().splitlines()) == 1
