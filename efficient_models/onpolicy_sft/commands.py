"""The typer commands: `wb train reasoner`, `wb train onpolicy-sft`, `wb train grpo-length` (from the
registry) and the function behind `wb eval reasoning`. Training and model loading are imported when a
command runs, so `wb --help` stays fast."""

from __future__ import annotations

from pathlib import Path

import typer

from workbench.console import console, markdown_table
from workbench.errors import InputError
from workbench.files import write_json_atomically, write_text_atomically
from workbench.output_paths import output_folder

HERE = Path(__file__).parent
DEFAULT_REASONER = HERE / "reasoner.yaml"
DEFAULT_ONPOLICY = HERE / "onpolicy-sft.yaml"
DEFAULT_GRPO = HERE / "grpo-length.yaml"


def _config(path: Path, method: str, steps: int | None, model: str | None):
    from efficient_models.registry import load_config

    config = load_config(path)
    if config.method != method:  # by name: the GRPO config extends the on-policy one
        raise InputError(f"{path} is a {config.method!r} config; `wb train {method}` needs a {method} one")
    if steps is not None:
        optimisation = config.optimisation.model_copy(update={"steps": steps})
        config = config.model_copy(update={"optimisation": optimisation})
    return config.model_copy(update={"model": model}) if model is not None else config


def _report(result) -> None:
    record = result.stages["train"]
    console.print(f"{result.metrics['description']}: {record.step} steps, median {record.median_step_seconds:.2f} "
                  f"s/step, loss {record.losses[0]:.3f} -> {record.losses[-1]:.3f}; run folder {result.run_dir}")


def train_reasoner_command(
    config: Path = typer.Option(DEFAULT_REASONER, "--config", help="A reasoner config (default: the shipped one)."),
    out: Path = typer.Option(Path("runs/train-reasoner"), "--out", help="Run folder.", callback=output_folder),
    model: str | None = typer.Option(None, "--model", help="Start from: 'default', a HF folder or a run folder."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override the config's number of steps."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint, or start over."),
) -> None:
    """SFT on verbose step-by-step solutions: the verbose starting reasoner of on-policy SFT."""
    from efficient_models.onpolicy_sft.models import load_reasoning_model
    from efficient_models.onpolicy_sft.reasoner import train_reasoner

    settings = _config(config, "reasoner", steps, model)
    language_model, tokenizer = load_reasoning_model(settings.model)
    _report(train_reasoner(settings, language_model, tokenizer, out, resume=resume))


def train_onpolicy_command(
    config: Path = typer.Option(DEFAULT_ONPOLICY, "--config", help="An onpolicy-sft config (default: shipped)."),
    out: Path = typer.Option(Path("runs/train-onpolicy-sft"), "--out", help="Run folder.", callback=output_folder),
    model: str | None = typer.Option(None, "--model", help="Start from: 'default', a HF folder or a run folder "
                                                           "(default: the config's, a `wb train reasoner` run)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override the config's number of steps."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint, or start over."),
) -> None:
    """Fine-tune on the model's own correct samples that finish within a (shrinking) length budget."""
    from efficient_models.onpolicy_sft.models import load_reasoning_model
    from efficient_models.onpolicy_sft.onpolicy import train_onpolicy

    settings = _config(config, "onpolicy-sft", steps, model)
    language_model, tokenizer = load_reasoning_model(settings.model)
    _report(train_onpolicy(settings, language_model, tokenizer, out, resume=resume))


def train_grpo_command(
    config: Path = typer.Option(DEFAULT_GRPO, "--config", help="A grpo-length config (default: shipped)."),
    out: Path = typer.Option(Path("runs/train-grpo-length"), "--out", help="Run folder.", callback=output_folder),
    model: str | None = typer.Option(None, "--model", help="Start from: 'default', a HF folder or a run folder "
                                                           "(default: the config's, a `wb train reasoner` run)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override the config's number of steps."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Keep a finished run, or start over."),
) -> None:
    """The RL baseline: TRL's GRPO with a length-penalised reward and KL to the start, same prompts and samples."""
    from efficient_models.onpolicy_sft.grpo import train_grpo

    settings = _config(config, "grpo-length", steps, model)
    metrics = train_grpo(settings, out, resume=resume)
    console.print(f"{metrics['description']}: {metrics['steps']} steps, {metrics['seconds_per_step']:.2f} s/step, "
                  f"reward {metrics['reward_first_last']}; run folder {out}")


def eval_reasoning_command(
    model: list[str] = typer.Option(["default"], "--model", help="'default', a HF model folder or a reasoning run "
                                                                 "folder; repeat to compare several."),
    problems: int = typer.Option(50, "--problems", min=1, help="Test problems (the first of the test split)."),
    samples: int = typer.Option(8, "--samples", min=1, help="Samples per problem."),
    k: list[int] = typer.Option([1, 8], "--k", min=1, help="pass@k for each k (at most --samples)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Token cap: longer is truncated."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.01),
    task_seed: int = typer.Option(0, "--task-seed", help="The task's seed (the splits' seed)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    out: Path | None = typer.Option(None, "--out", help="Folder for results.json, table.md and the accuracy-length "
                                                        "plot pareto.html.", callback=output_folder),
) -> None:
    """Accuracy (pass@1, pass@k) and length (mean, median, share truncated) on the reasoning test split, each
    model against the first, with each run's training seconds per step and peak memory."""
    from efficient_models.onpolicy_sft.comparison import COLUMNS, compared_to_first, training_costs
    from efficient_models.onpolicy_sft.evaluation import evaluate_reasoning
    from efficient_models.onpolicy_sft.models import load_reasoning_model
    from efficient_models.onpolicy_sft.pareto import accuracy_length_figure
    from efficient_models.onpolicy_sft.task import problems as task_problems

    if any(value > samples for value in k):
        raise InputError(f"--k {max(k)} is above --samples {samples}: pass@k needs k <= samples")
    test_problems = task_problems("test", problems, task_seed)
    results = []
    for source in model:
        language_model, tokenizer = load_reasoning_model(source)
        metrics = evaluate_reasoning(language_model, tokenizer, test_problems, samples, max_new_tokens, k,
                                     temperature, seed)
        results.append({"model": source} | metrics | training_costs(source))
        console.print(" ".join(f"{name} {value}" for name, value in results[-1].items() if name != "example"))
    results = compared_to_first(results)
    table = markdown_table(results, COLUMNS, digits=3)
    console.print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomically(out / "results.json", results)
        write_text_atomically(out / "table.md", table)
        write_text_atomically(out / "pareto.html", accuracy_length_figure(results).to_html(include_plotlyjs="cdn"))
