"""`wb train reasoner`: supervised fine-tuning on verbose worked solutions, the verbose starting reasoner.

The model learns the long step-by-step solutions (restatements, a check per step, a final recheck) of the
train split, so that it starts on-policy SFT with accuracy and with length to remove. The loss is the same
token-mean cross-entropy on solution tokens that on-policy SFT uses; the plan is fixed by the seed (epochs
over the train problems, each shuffled) and runs in the repo's training loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from efficient_models.onpolicy_sft.config import ReasonerConfig
from efficient_models.onpolicy_sft.loss import ResponseLoss, token_mean_micro_batches
from efficient_models.onpolicy_sft.models import RUN_MODEL, save_causal_lm
from efficient_models.onpolicy_sft.sampling import encode_prompt, stop_ids
from efficient_models.onpolicy_sft.task import problems
from efficient_models.registry import RUN_CONFIG
from workbench.configs import yaml_text
from workbench.files import write_json_atomically
from workbench.training.loop import Step, TrainingRecord, TrainingResult, open_run, train
from workbench.training.metrics import hardware, loss_summary

SHUFFLE_STREAM = 1801  # the seed streams of this recipe's shuffles and steps, apart from other recipes'
STEP_STREAM = 1802
OUTPUTS = (RUN_MODEL, "metrics.json")


def solution_rows(config: ReasonerConfig, tokenizer: PreTrainedTokenizerBase, end_id: int
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """Each train problem's prompt tokens, and its verbose solution's tokens ended by `end_id`."""
    train_problems = problems("train", config.train_problems, config.task.seed, config.task.min_events,
                              config.task.max_events)
    prompts = [encode_prompt(tokenizer, problem.prompt) for problem in train_problems]
    solutions = [list(tokenizer(problem.verbose_solution(), add_special_tokens=False)["input_ids"]) + [end_id]
                 for problem in train_problems]
    return prompts, solutions


def step_plan(config: ReasonerConfig, prompts: list[list[int]], solutions: list[list[int]], pad_id: int) -> list[Step]:
    """`rows_per_step` rows per step, taken from epochs over the problems, each epoch in its own seeded order."""
    steps, per_step = config.optimisation.steps, config.rows_per_step
    epochs = -(-steps * per_step // len(prompts))
    order = np.concatenate([np.random.default_rng([SHUFFLE_STREAM, config.optimisation.seed, epoch])
                            .permutation(len(prompts)) for epoch in range(epochs)])
    plan = []
    for step in range(steps):
        rows = order[step * per_step:(step + 1) * per_step]
        plan.append(token_mean_micro_batches([prompts[i] for i in rows], [solutions[i] for i in rows], pad_id,
                                             config.rows_per_micro_batch))
    return plan


def train_reasoner(config: ReasonerConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   run_dir: Path, resume: bool = True) -> TrainingResult:
    """Fine-tune all of `model`'s weights on the verbose solutions; the run folder gets `model/` and metrics."""
    run_dir = Path(run_dir)
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stop_ids(model, tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    prompts, solutions = solution_rows(config, tokenizer, end_id)
    description = f"reasoner ({config.train_problems} verbose solutions)"

    def metrics(record: TrainingRecord) -> dict:
        return {"description": description, "precision": config.optimisation.precision, **loss_summary(record),
                "mean_solution_tokens": round(float(np.mean([len(s) for s in solutions])), 1),
                "hardware": hardware(next(model.parameters()).device)}

    def write_outputs(record: TrainingRecord) -> None:
        save_causal_lm(model, tokenizer, run_dir)
        write_json_atomically(run_dir / "metrics.json", metrics(record))

    with open_run(run_dir, {RUN_CONFIG: yaml_text(config, "the verbose reasoner's config")}, resume, OUTPUTS):
        model.train()
        record = train(ResponseLoss(model), dict(model.named_parameters()),
                       step_plan(config, prompts, solutions, pad_id), config.optimisation, run_dir,
                       seed_entropy=(STEP_STREAM, config.optimisation.seed), description=description,
                       on_finish=write_outputs)
    model.eval()
    return TrainingResult(run_dir, {"train": record}, metrics(record))
