"""The GRPO baseline: its length-penalised reward by hand, its config, and a 2-step TRL run on a tiny saved
model that logs every step on the same prompts as on-policy SFT."""

import json
import math

import pytest
import torch

from efficient_models.onpolicy_sft.commands import DEFAULT_GRPO
from efficient_models.onpolicy_sft.config import GRPOLengthConfig
from efficient_models.onpolicy_sft import grpo
from efficient_models.onpolicy_sft.grpo import length_penalised_reward, train_grpo
from efficient_models.onpolicy_sft.models import save_causal_lm
from efficient_models.onpolicy_sft.task import problems
from efficient_models.registry import load_config
from tests.test_onpolicy_sampling import char_tokenizer, tiny_lm
from workbench.errors import InputError

OPTIMISATION = {"steps": 2, "learning_rate": 1e-3, "warmup_steps": 0, "final_learning_rate_ratio": 1.0,
                "weight_decay": 0.0, "max_grad_norm": 1.0, "checkpoint_every": 10, "precision": "fp32"}


@pytest.mark.parametrize("correct, finished, tokens, expected", [
    (True, True, 50, 1 - 0.5 * 0.5),  # half the budget used
    (True, False, 100, -0.5),  # truncated: no credit for the box, the whole budget used
    (False, True, 10, -0.05),
    (True, True, 150, 1 - 0.5),  # over the budget: the length term is capped
])
def test_length_penalised_reward_by_hand(correct, finished, tokens, expected):
    assert length_penalised_reward(correct, finished, tokens, budget=100, length_weight=0.5) == pytest.approx(expected)


def test_config_checks_micro_batches_and_the_shipped_one_validates():
    shipped = load_config(DEFAULT_GRPO)
    assert isinstance(shipped, GRPOLengthConfig) and shipped.kl_beta > 0
    with pytest.raises(ValueError, match="must divide"):
        GRPOLengthConfig(prompts_per_step=3, samples_per_prompt=3, max_new_tokens=8, budget_start=8,
                         rows_per_micro_batch=2, optimisation=OPTIMISATION)


def test_a_two_step_run_logs_each_step_and_saves_the_model(tmp_path, monkeypatch):
    graded = []
    monkeypatch.setattr(grpo, "is_correct", lambda text, answer: graded.append(answer) or False)
    start = tmp_path / "start"
    save_causal_lm(tiny_lm(), char_tokenizer(), start)
    config = GRPOLengthConfig(model=str(start), prompts_per_step=2, samples_per_prompt=2, max_new_tokens=10,
                              budget_start=10, budget_end=5, rows_per_micro_batch=2, optimisation=OPTIMISATION)
    metrics = train_grpo(config, tmp_path / "grpo")
    log = [json.loads(line) for line in (tmp_path / "grpo" / "steps.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [0, 1] and [entry["budget"] for entry in log] == [10, 5]
    for entry in log:
        # A random model answers nothing right: every reward is the length term alone, in [-0.5, 0].
        assert -0.5 <= entry["reward_mean"] <= 0 and 0 <= entry["share_truncated"] <= 1 and "kl" in entry
    assert metrics["steps"] == 2 and metrics["peak_memory_mb"] > 0
    assert metrics["precision"] == config.optimisation.precision == "fp32"  # as our loop computes, not TRL's default
    # The same train problems, in the same order, as on-policy SFT's steps: each prompt's 2 samples together.
    assert graded == [problem.answer for problem in problems("train", 4) for _ in range(2)]
    assert (tmp_path / "grpo" / "model" / "config.json").is_file()
    # A finished run is kept on resume, not trained again.
    assert train_grpo(config, tmp_path / "grpo") == metrics
    # Another config on the same folder is refused rather than mixed in.
    with pytest.raises(InputError, match="different config.yaml"):
        train_grpo(config.model_copy(update={"kl_beta": 0.5}), tmp_path / "grpo")


def test_a_bf16_run_trains_under_autocast_like_our_loop(tmp_path, monkeypatch):
    seen = []
    reward = grpo.length_penalised_reward
    monkeypatch.setattr(grpo, "length_penalised_reward",
                        lambda *args: seen.append(torch.is_autocast_enabled("cpu")) or reward(*args))
    start = tmp_path / "start"
    save_causal_lm(tiny_lm(), char_tokenizer(), start)
    config = GRPOLengthConfig(model=str(start), prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6,
                              budget_start=6, rows_per_micro_batch=2,
                              optimisation=OPTIMISATION | {"steps": 1, "precision": "bf16"})
    metrics = train_grpo(config, tmp_path / "grpo")
    log = [json.loads(line) for line in (tmp_path / "grpo" / "steps.jsonl").read_text().splitlines()]
    assert metrics["precision"] == "bf16" and len(log) == 1 and math.isfinite(log[0]["loss"])
    assert seen and all(seen)  # the step ran under bf16 autocast
    # ... which ended with the run: a later run of our loop in this process is not turned to bf16.
    assert not torch.is_autocast_enabled("cpu")
