"""`wb train skipgpt`: its options; the work is in `training.py`, imported when the command runs."""

from __future__ import annotations

from pathlib import Path

import typer

from workbench.console import console, status_console
from workbench.errors import InputError
from workbench.output_paths import output_folder


def train_command(
    stage: str = typer.Option(..., "--stage", help="routers: the model frozen, routers trained with the sparsity "
                                                   "loss; lora: the routers of --routers frozen, LoRA trained."),
    sparsity: float | None = typer.Option(None, "--sparsity", min=0.0, max=0.99,
                                          help="Share of modules (attention and MLP, per real token) to skip, e.g. "
                                               "0.25 (router stage; default: the config's, else 0.25)."),
    routers: Path | None = typer.Option(None, "--routers", help="A finished `--stage routers` run (lora stage)."),
    config: Path | None = typer.Option(None, "--config", help="A skipgpt config YAML (router stage; default: the "
                                                              "defaults)."),
    model: str | None = typer.Option(None, "--model", help="`default` (SmolLM2-135M-Instruct from its packaged "
                                                           "GGUF) or a local Llama-family causal LM folder."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Training recipe YAML (default: the shipped one)."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: runs/train-skipgpt-<stage>).",
                                    callback=output_folder),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint, or start over."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override the stage's number of steps."),
    smoke: bool = typer.Option(False, "--smoke", help="3 steps (or --steps) on 8 blocks: checks the wiring, "
                                                      "times steps."),
) -> None:
    """Train SkipGPT's routers (model frozen), then LoRA under the frozen routers, on a Llama-family LM."""
    import yaml

    from efficient_models.registry import load_config, run_config
    from efficient_models.skipgpt.config import SkipGPTConfig
    from efficient_models.skipgpt.training import DEFAULT_RECIPE, load_recipe, smoke_recipe, train_skipgpt
    from workbench.models.causal_lm import load_causal_lm

    if stage not in ("routers", "lora"):
        raise InputError(f"--stage {stage!r}: choose routers or lora")
    if stage == "routers":
        if routers is not None:
            raise InputError("--routers belongs to --stage lora")
        method_config = load_config(config) if config else SkipGPTConfig()
        if not isinstance(method_config, SkipGPTConfig):
            raise InputError(f"{config} is a {method_config.method!r} config; `wb train skipgpt` needs a skipgpt one")
    else:
        if routers is None:
            raise InputError("--stage lora needs --routers RUN, a finished `wb train skipgpt --stage routers` run")
        if sparsity is not None or config is not None:
            raise InputError("--sparsity and --config belong to --stage routers; the lora stage keeps its router "
                             "run's config")
        method_config = run_config(routers, "skipgpt")
        kind = yaml.safe_load((routers / "stage.yaml").read_text()) if (routers / "stage.yaml").is_file() else {}
        if kind.get("stage") != "routers":
            raise InputError(f"{routers} is not a `--stage routers` run")
    updates = {"sparsity": sparsity, "model": model}
    method_config = method_config.model_copy(update={key: value for key, value in updates.items() if value is not None})
    SkipGPTConfig.model_validate(method_config.model_dump())  # an override must still make a valid config
    settings = load_recipe(recipe or DEFAULT_RECIPE)
    if smoke:
        settings = smoke_recipe(settings, stage, steps)
    elif steps is not None:
        settings = settings.with_optimisation(stage, steps=steps)
    out = out or Path(f"runs/train-skipgpt-{stage}")
    language_model, tokenizer = load_causal_lm(method_config.model)
    try:
        result = train_skipgpt(method_config, settings, stage, out, language_model, tokenizer,
                               routers_run=routers, resume=resume)
    except KeyboardInterrupt:
        status_console.print(f"interrupted; `wb train skipgpt --stage {stage} --out {out}` with the same options "
                             "continues")
        raise typer.Exit(130) from None
    record = result.stages[stage]
    console.print(f"{result.metrics['description']}: {record.step} steps, median {record.median_step_seconds:.2f} "
                  f"s/step, loss {record.losses[0]:.3f} -> {record.losses[-1]:.3f}; run folder {result.run_dir}")
