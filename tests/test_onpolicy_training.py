"""The verbose reasoner's SFT and on-policy SFT in the repo's training loop, on a tiny random Llama with a
character tokenizer: plans, per-step filter logs, budgets, seeding, saved models; and the eval metrics."""

import json

import pytest
import torch

from efficient_models.onpolicy_sft import evaluation
from efficient_models.onpolicy_sft.config import OnPolicySFTConfig, ReasonerConfig
from efficient_models.onpolicy_sft.filtering import Sample
from efficient_models.onpolicy_sft.loss import IGNORE
from efficient_models.onpolicy_sft.models import load_reasoning_model
from efficient_models.onpolicy_sft.onpolicy import OnPolicySteps, read_step_log, train_onpolicy
from efficient_models.onpolicy_sft.reasoner import solution_rows, step_plan, train_reasoner
from efficient_models.onpolicy_sft.task import problems
from tests.test_onpolicy_sampling import char_tokenizer, tiny_lm
from workbench.training.optimisation import Optimisation


def _optimisation(steps: int, learning_rate: float = 3e-3) -> dict:
    return Optimisation(steps=steps, learning_rate=learning_rate, warmup_steps=0, final_learning_rate_ratio=1.0,
                        weight_decay=0.0, max_grad_norm=1.0, checkpoint_every=100, precision="fp32").model_dump()


def _reasoner_config(steps: int = 6) -> ReasonerConfig:
    return ReasonerConfig(task={"min_events": 1, "max_events": 2}, train_problems=8, rows_per_step=4,
                          rows_per_micro_batch=2, optimisation=_optimisation(steps))


def _onpolicy_config(**changes) -> OnPolicySFTConfig:
    settings = dict(prompts_per_step=3, samples_per_prompt=6, max_new_tokens=40, budget_start=30, budget_end=10,
                    rows_per_micro_batch=4, optimisation=_optimisation(3))
    return OnPolicySFTConfig(**settings | changes)


def _uniform_lm():
    """Every next token equally likely, end-of-sequence included (1 in 99): some samples end, some run on."""
    model = tiny_lm()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_reasoner_plan_labels_the_verbose_solutions_only():
    tokenizer, config = char_tokenizer(), _reasoner_config(steps=3)
    prompts, solutions = solution_rows(config, tokenizer, tokenizer.eos_token_id)
    plan = step_plan(config, prompts, solutions, tokenizer.pad_token_id)
    assert len(plan) == 3 and all(len(step) == 2 for step in plan)  # 4 rows per step, 2 per micro-batch
    first = plan[0][0].tensors
    labels = [token for token in first["labels"][0].tolist() if token != IGNORE]
    text = tokenizer.decode(labels[:-1])
    assert labels[-1] == tokenizer.eos_token_id and text.endswith("}.") and "Let me check" in text
    assert text in {p.verbose_solution() for p in problems("train", 8, min_events=1, max_events=2)}
    step_tokens = sum(int((b.tensors["labels"][:, 1:] != IGNORE).sum()) for b in plan[0])
    assert all(batch.loss_divisor == step_tokens for batch in plan[0])  # a token mean over the whole step
    # Epochs cover every problem once before any repeats.
    seen = [tuple(b.tensors["input_ids"][row].tolist()) for step in plan[:2] for b in step for row in range(2)]
    assert len(set(seen)) == 8


def test_reasoner_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    tokenizer, model = char_tokenizer(), tiny_lm()
    result = train_reasoner(_reasoner_config(steps=5), model, tokenizer, tmp_path / "reasoner")
    losses = result.stages["train"].losses
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.3  # from ln(99) = 4.6: it learns the characters
    metrics = json.loads((tmp_path / "reasoner" / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["mean_solution_tokens"] > 300
    reloaded, reloaded_tokenizer = load_reasoning_model(tmp_path / "reasoner")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert reloaded_tokenizer.encode("7 + 3") == tokenizer.encode("7 + 3")


def test_onpolicy_steps_log_every_count_and_follow_the_budget(tmp_path):
    config, tokenizer, model = _onpolicy_config(), char_tokenizer(), _uniform_lm()
    run_dir = tmp_path / "onpolicy"
    result = train_onpolicy(config, model, tokenizer, run_dir, grade=lambda text, answer: True)
    log = read_step_log(run_dir)
    assert [entry["step"] for entry in log] == [0, 1, 2]
    assert [entry["budget"] for entry in log] == [30, 20, 10]
    for entry in log:
        assert entry["samples"] == 18 and entry["prompts"] == 3
        assert entry["kept"] + entry["truncated"] + entry["over_budget"] + entry["wrong"] == entry["samples"]
        assert entry["wrong"] == 0  # every answer graded correct: only length and ending reject
    assert sum(entry["kept"] for entry in log) > 0 and sum(entry["truncated"] for entry in log) > 0
    assert sum(entry["over_budget"] for entry in log) > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["filter_totals"]["kept"] == sum(entry["kept"] for entry in log)
    assert metrics["budget_first_last"] == [30, 10]
    assert (run_dir / "model" / "config.json").is_file()
    assert len(result.stages["train"].losses) == 3
    # A finished run is not sampled again on resume: the log is left as it was.
    before = (run_dir / "steps.jsonl").read_text()
    train_onpolicy(config, _uniform_lm(), tokenizer, run_dir, grade=lambda text, answer: True)
    assert (run_dir / "steps.jsonl").read_text() == before


def test_onpolicy_steps_are_seeded(tmp_path):
    runs = []
    for name in ("a", "b"):
        config = _onpolicy_config(optimisation=_optimisation(2))
        train_onpolicy(config, _uniform_lm(), char_tokenizer(), tmp_path / name, grade=lambda text, answer: True)
        runs.append([{key: value for key, value in entry.items() if key not in ("sampling_seconds", "peak_memory_mb")}
                     for entry in read_step_log(tmp_path / name)])
    assert runs[0] == runs[1]


def test_a_step_that_keeps_nothing_leaves_the_weights_alone(tmp_path):
    model = _uniform_lm()
    before = {name: parameter.clone() for name, parameter in model.named_parameters()}
    train_onpolicy(_onpolicy_config(), model, char_tokenizer(), tmp_path / "run", grade=lambda text, answer: False)
    log = read_step_log(tmp_path / "run")
    assert all(entry["kept"] == 0 and entry["prompts_dropped"] == 3 for entry in log)
    assert all(torch.equal(parameter, before[name]) for name, parameter in model.named_parameters())


def test_the_step_log_drops_entries_an_interrupted_run_left(tmp_path):
    config = _onpolicy_config()
    plan = OnPolicySteps(config, _uniform_lm(), char_tokenizer(), tmp_path)
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps({"step": s, "stale": True}) + "\n" for s in range(3)))
    torch.manual_seed(0)
    plan[1]
    log = read_step_log(tmp_path)
    assert [entry["step"] for entry in log] == [0, 1] and "stale" not in log[1]
    with pytest.raises(IndexError):
        plan[3]


def test_budget_settings_are_checked():
    with pytest.raises(ValueError, match="above max_new_tokens"):
        _onpolicy_config(budget_start=50)
    with pytest.raises(ValueError, match="only shrinks"):
        _onpolicy_config(budget_end=35)


def test_eval_metrics_from_known_samples(monkeypatch):
    test_problems = problems("test", 2)
    first, second = test_problems[0].answer, test_problems[1].answer
    fixed = [Sample(0, f"\\boxed{{{first}}}", (1,) * 10, True), Sample(0, f"so \\boxed{{{first}}}", (1,) * 20, True),
             Sample(0, f"\\boxed{{{first}}}", (1,) * 30, False),  # a correct box, but truncated: wrong
             Sample(1, "\\boxed{-1}", (1,) * 5, True), Sample(1, "", (1,) * 30, False),
             Sample(1, f"{second}", (1,) * 6, True)]  # no box
    monkeypatch.setattr(evaluation, "sample_responses", lambda *args, **kwargs: fixed)
    metrics = evaluation.evaluate_reasoning(None, char_tokenizer(), test_problems, 3, max_new_tokens=30, ks=(1, 2))
    assert metrics["pass@1"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-4)
    assert metrics["pass@2"] == pytest.approx((1 - 0 / 3 + 0) / 2, abs=1e-4)  # C(1,2) = 0
    assert metrics["mean_tokens"] == pytest.approx(101 / 6, abs=0.01) and metrics["median_tokens"] == 15.0
    assert metrics["share_truncated"] == pytest.approx(2 / 6, abs=1e-4)
    with pytest.raises(ValueError, match="pass@k"):
        evaluation.evaluate_reasoning(None, char_tokenizer(), test_problems, 3, max_new_tokens=30, ks=(4,))
