"""`wb train grpo-length`: the RL baseline, TRL's `GRPOTrainer` with a length-penalised reward.

The baseline the issue asks on-policy SFT to beat, kept independent of our loop: TRL samples
`samples_per_prompt` completions of each of `prompts_per_step` prompts per step (the same train problems, in
the same order, as on-policy SFT), rewards them with `length_penalised_reward`, normalises rewards within each
prompt's group and adds a KL penalty to the starting model (TRL's reference copy). It computes as our loop
does, so that time and memory per step compare: in the config's precision (bf16 autocast where native, around
the whole of TRL's step, its sampling included) and without activation checkpointing (TRL's default turns it on,
trading compute for memory). The autocast is ours rather than TRL's `bf16=True`, which would set Accelerate's
process-wide precision for every later run in the process. The length term's budget
follows the same schedule as on-policy SFT's. TRL needs the starting model as a folder (it loads the reference
model from it), so "default" is saved once into the run folder. A run is not resumable mid-way (TRL's own
checkpoints are off); a finished run is left as it is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from efficient_models.onpolicy_sft.config import GRPOLengthConfig
from efficient_models.onpolicy_sft.grader import is_correct
from efficient_models.onpolicy_sft.models import RUN_MODEL, load_reasoning_model, save_causal_lm
from efficient_models.onpolicy_sft.onpolicy import STEP_LOG, peak_memory_mb
from efficient_models.onpolicy_sft.sampling import BudgetSchedule
from efficient_models.onpolicy_sft.task import problems
from efficient_models.registry import RUN_CONFIG
from workbench.configs import yaml_text
from workbench.errors import InputError
from workbench.files import write_json_atomically, write_text_atomically
from workbench.training.loop import open_run
from workbench.training.precision import autocast, resolve_precision

START_MODEL = "start-model"  # the default model saved as a folder, for TRL's reference copy
OUTPUTS = (RUN_MODEL, "metrics.json", STEP_LOG, "trl")
LOGGED = {"reward": "reward_mean", "reward_std": "reward_std", "completions/mean_length": "mean_sample_tokens",
          "completions/clipped_ratio": "share_truncated", "kl": "kl", "loss": "loss", "step_time": "step_seconds"}


def length_penalised_reward(correct: bool, finished: bool, num_tokens: int, budget: int, length_weight: float
                            ) -> float:
    """1 for a correct answer that finished, minus `length_weight` x the share of `budget` used (capped at 1;
    a truncated response uses all of it)."""
    used = 1.0 if not finished else min(num_tokens / budget, 1.0)
    return float(correct and finished) - length_weight * used


def _model_folder(source: str, run_dir: Path) -> Path:
    """A folder TRL can load the policy and its reference copy from."""
    if source != "default":
        folder = Path(source)
        return folder / RUN_MODEL if (folder / RUN_MODEL).is_dir() else folder
    folder = run_dir / START_MODEL
    if not (folder / "config.json").is_file():
        model, tokenizer = load_reasoning_model("default")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def _finished_metrics(run_dir: Path, config_text: str) -> dict | None:
    """The metrics of a finished run of the same config in `run_dir`; None when there is none to keep."""
    if not ((run_dir / "metrics.json").is_file() and (run_dir / RUN_MODEL).is_dir()):
        return None
    if (run_dir / RUN_CONFIG).read_text() != config_text:
        raise InputError(f"{run_dir} holds a run with a different {RUN_CONFIG}; pass --no-resume to start over or "
                         "choose another --out")
    return json.loads((run_dir / "metrics.json").read_text())


def train_grpo(config: GRPOLengthConfig, run_dir: Path, resume: bool = True) -> dict:
    """Run the baseline; returns (and writes) its metrics. The run folder gets `model/` and `steps.jsonl`."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    run_dir = Path(run_dir)
    config_text = yaml_text(config, "the GRPO baseline's config")
    finished = _finished_metrics(run_dir, config_text) if resume else None
    if finished is not None:
        return finished
    with open_run(run_dir, {RUN_CONFIG: config_text}, resume=False, outputs=OUTPUTS):
        folder = _model_folder(config.model, run_dir)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        steps, rows = config.optimisation.steps, config.prompts_per_step * config.samples_per_prompt
        chosen = problems("train", steps * config.prompts_per_step, config.task.seed, config.task.min_events,
                          config.task.max_events)
        # Conversational prompts get the chat template, as `sampling.encode_prompt` gives on-policy SFT.
        prompt = (lambda text: [{"role": "user", "content": text}]) if tokenizer.chat_template else (lambda text: text)
        dataset = Dataset.from_list([{"prompt": prompt(p.prompt), "answer": p.answer} for p in chosen])
        budget = BudgetSchedule(config.budget_start, config.budget_end, steps)
        stops = {tokenizer.eos_token_id}

        def reward(completions, completion_ids, answer, trainer_state, **unused) -> list[float]:
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            return [length_penalised_reward(is_correct(text, reference), bool(ids) and ids[-1] in stops, len(ids),
                                            budget.at(trainer_state.global_step), config.length_weight)
                    for text, ids, reference in zip(texts, completion_ids, answer)]

        optimisation = config.optimisation
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = resolve_precision(optimisation.precision, device)
        arguments = GRPOConfig(
            output_dir=str(run_dir / "trl"), max_steps=steps, num_generations=config.samples_per_prompt,
            per_device_train_batch_size=config.rows_per_micro_batch, generation_batch_size=rows,
            gradient_accumulation_steps=rows // config.rows_per_micro_batch,
            max_completion_length=config.max_new_tokens, temperature=config.temperature, top_k=0, top_p=1.0,
            beta=config.kl_beta, learning_rate=optimisation.learning_rate, warmup_steps=optimisation.warmup_steps,
            weight_decay=optimisation.weight_decay, max_grad_norm=optimisation.max_grad_norm,
            # Our loop's schedule: linear warmup, then cosine down to the final ratio of the peak.
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": optimisation.final_learning_rate_ratio}, seed=optimisation.seed,
            shuffle_dataset=False, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=False,
            use_cpu=device.type == "cpu", bf16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(model=str(folder), reward_funcs=[reward], args=arguments, train_dataset=dataset,
                              processing_class=tokenizer)
        started = time.perf_counter()
        with autocast(precision, device):
            trainer.train()
        seconds = time.perf_counter() - started
        log = [{"step": entry["step"] - 1, "budget": budget.at(entry["step"] - 1),
                **{ours: entry[theirs] for theirs, ours in LOGGED.items() if theirs in entry}}
               for entry in trainer.state.log_history if "reward" in entry]
        write_text_atomically(run_dir / STEP_LOG, "".join(json.dumps(entry) + "\n" for entry in log))
        save_causal_lm(trainer.model, tokenizer, run_dir)
        device = next(trainer.model.parameters()).device
        metrics = {"description": f"grpo-length ({config.prompts_per_step} prompts x {config.samples_per_prompt} "
                                  f"samples, length weight {config.length_weight}, KL {config.kl_beta})",
                   "precision": precision, "steps": len(log), "seconds": round(seconds, 1),
                   "seconds_per_step": round(seconds / steps, 3),
                   "peak_memory_mb": round(peak_memory_mb(device), 1),
                   "reward_first_last": [log[0]["reward_mean"], log[-1]["reward_mean"]] if log else None}
        write_json_atomically(run_dir / "metrics.json", metrics)
    return metrics
