"""The base library's commands: inspect a model on an image, build the default model, data, evaluation,
the tracing benchmark and the default model's training recipe. The `wb` root (`wb.cli`) mounts them.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import Progress
from rich.table import Table

from workbench.console import MODEL_OPTION, console, load_with_notes, status_console
from workbench.output_paths import output_folder

models_app = typer.Typer(help="Build and describe models.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: probe scenes with ground truth.", no_args_is_help=True)


def inspect(
    image: str = typer.Argument(..., help="An image path, sample:NAME (astronaut, chelsea, coffee, rocket, china, flower) or probe:SPLIT:INDEX."),
    model: str = MODEL_OPTION,
    prompt: str = typer.Option("Describe the image.", "--prompt", "-p"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    max_new_tokens: int = typer.Option(40, min=1, help="Length limit of the answer."),
) -> None:
    """How a model sees one image: visual tokens, answer, norms per layer, nearest vocabulary tokens."""
    from workbench.data.images import load_image
    from workbench.prompts import check_prompt_text

    check_prompt_text(prompt)
    picture = load_image(image)
    from workbench.inspection import inspect_image  # torch loads only once the cheap checks have passed

    loaded = load_with_notes(model)
    with status_console.status("tracing ..."):
        report = inspect_image(loaded, picture, prompt, max_new_tokens=max_new_tokens)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    grids = " + ".join(f"{rows}x{cols}" for rows, cols in report.grids)
    where = f"in a {grids} grid" if len(report.grids) == 1 else f"in grids {grids}"
    if report.non_grid_tokens:
        where += f" and {report.non_grid_tokens} row-end tokens in no grid"
    console.print(f"[bold]{image}[/] on [bold]{report.model}[/]: {report.num_visual_tokens} visual tokens {where}")
    console.print(f"[bold]prompt:[/] {report.prompt}\n[bold]answer:[/] {report.answer}")
    norms = Table("layer", "visual mean norm", "text mean norm", title="Mean hidden-state norm per LLM layer")
    for row in report.layer_norms:
        norms.add_row(row.layer, f"{row.visual:.2f}", f"{row.text:.2f}")
    console.print(norms)
    several = len(report.grids) > 1  # then say which grid a token's row and column are in
    nearest = Table("token", *(["grid"] if several else []), "row", "col", "norm", "nearest vocabulary tokens (cosine)",
                    title="Visual tokens read against the input embeddings")
    for token in report.nearest_tokens:
        words = ", ".join(f"{word!r} {score:.2f}" for word, score in token.neighbours)
        nearest.add_row(str(token.index), *([str(token.grid)] if several else []), str(token.row), str(token.col),
                        f"{token.norm:.2f}", words)
    console.print(nearest)


@models_app.command("build-default")
def build_default(force: bool = typer.Option(False, help="Rebuild even if the cache exists.")) -> None:
    """Convert the packaged DINOv2 + SmolLM2 weights once and cache them (safetensors)."""
    from workbench.models.default_model import build_default_model

    path = build_default_model(force=force, progress=lambda message: status_console.print(message))
    console.print(f"default model ready in {path}")


@models_app.command("supported")
def supported() -> None:
    """The model families (config model_type) the adapters support."""
    from workbench.models.adapter import supported_model_types

    for model_type in supported_model_types():
        print(model_type)


def bench_trace(
    model: str = MODEL_OPTION,
    image: str = typer.Option("sample:astronaut", help="Image for the batch."),
    batch_size: int = typer.Option(1, min=1),
    repeats: int = typer.Option(10, min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Overhead of capturing every LLM layer vs a plain forward with output_hidden_states=True."""
    from workbench.bench_trace import measure_trace_overhead
    from workbench.data.images import load_image
    from workbench.models.inputs import build_inputs

    loaded = load_with_notes(model)
    picture = load_image(image)
    inputs = build_inputs(loaded.processor, [picture] * batch_size, ["Describe the image."] * batch_size,
                          device=loaded.device)
    with Progress(console=status_console, transient=True) as progress:
        task = progress.add_task("plain vs traced forward", total=repeats)
        result = measure_trace_overhead(loaded, inputs, repeats=repeats,
                                        progress=lambda done, total: progress.update(task, completed=done))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    verdict = "[green]meets[/]" if result.meets_goal else "[red]misses[/]"
    console.print(
        f"{result.model}, batch {result.batch_size} x {result.sequence_length} tokens, {result.repeats} pairs: "
        f"plain {result.plain_median_s * 1000:.1f} ms, traced {result.traced_median_s * 1000:.1f} ms (medians); "
        f"median ratio {result.median_ratio:.3f}x ({verdict} the {result.goal}x goal)"
    )


@data_app.command("probe-scenes")
def probe_scenes(
    n: int = typer.Option(16, min=1, help="How many scenes."),
    seed: int = typer.Option(0, help="First scene index within the split."),
    split: str = typer.Option("train", help="train, val or test."),
    out: Path = typer.Option(..., help="Folder for the PNGs and scenes.jsonl.", callback=output_folder),
) -> None:
    """Write probe scenes (PNG) and their ground truth (JSONL) for a person to look at."""
    from workbench.data.probe_scenes import write_probe_scenes

    path = write_probe_scenes(out, n=n, seed=seed, split=split)
    console.print(f"wrote {n} scenes and {path}")


def eval_vqa(
    model: str = MODEL_OPTION,
    split: str = typer.Option("test", help="train, val or test."),
    n: int = typer.Option(500, min=1, help="How many questions, balanced over question types."),
    batch_size: int = typer.Option(8, min=1),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    weights: Path | None = typer.Option(None, "--weights", help="A `wb train default` run folder: the default "
                                        "model with its projector and LoRA instead of the shipped ones."),
) -> None:
    """Exact-match accuracy on probe-scene questions, next to no-vision and majority-answer references."""
    from workbench.evaluation.vqa import evaluate_vqa

    loaded = load_with_notes(model, default_weights=weights)
    with Progress(console=status_console, transient=True) as progress:
        task = progress.add_task("answering (model, then no vision)", total=2 * n)
        report = evaluate_vqa(loaded, split=split, n=n, batch_size=batch_size,
                              progress=lambda done, total: progress.update(task, completed=done, total=total))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    scores = Table("type", "n", "model", "no vision", "vision gain", "majority",
                   title=f"VQA exact match: {report.model} on {report.n} {report.split} questions "
                         f"({report.seconds:.0f} s)")
    for name, row in [*report.by_type.items(), ("overall", report.overall)]:
        if name == "overall":
            scores.add_section()
        scores.add_row(name, str(row.n), f"{row.model:.1%}", f"{row.no_vision:.1%}", f"{row.vision_gain:+.1%}",
                       f"{row.majority:.1%}")
    console.print(scores)
    examples = Table("question", "answer", "model", "no vision", title="First example of each type")
    for first, *_ in report.examples.values():
        examples.add_row(first.question, first.answer, repr(first.prediction), repr(first.no_vision_prediction))
    console.print(examples)


def train_default(
    config: Path | None = typer.Option(None, "--config", help="Recipe YAML (default: the shipped recipe)."),
    out: Path | None = typer.Option(None, "--out", callback=output_folder,
                                    help="Run folder (default: runs/train-default, runs/train-default-smoke with --smoke)."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="Continue from the run folder's last checkpoint, or start over."),
    install: bool = typer.Option(False, "--install", help="Copy the finished run's weights to where "
                                                          "load_model('default') applies them."),
    smoke: bool = typer.Option(False, "--smoke", help="4 steps per stage on 8 scenes: checks wiring, times steps."),
) -> None:
    """Train the default model: projector on captions, then projector + LoRA on questions (about an hour on 2 cores)."""
    from workbench.default_recipe.install import install_run, verify_installation
    from workbench.default_recipe.recipe import DEFAULT_RECIPE, RecipeError, load_recipe, smoke_recipe
    from workbench.default_recipe.train import train_default_model
    from workbench.models.default_model import DEFAULT_WEIGHTS_DIR

    if smoke and install:
        raise RecipeError("a --smoke run only checks the wiring; its weights are not for installing")
    recipe = load_recipe(config or DEFAULT_RECIPE)
    recipe = smoke_recipe(recipe) if smoke else recipe
    run_dir = out or Path("runs/train-default-smoke" if smoke else "runs/train-default")
    try:
        result = train_default_model(recipe, run_dir, resume=resume)
    except KeyboardInterrupt:
        status_console.print(f"interrupted; `wb train default --out {run_dir}` continues from the last checkpoint")
        raise typer.Exit(130) from None
    for name, stage in result.metrics["stages"].items():
        console.print(f"{name}: {stage['steps']} steps, {stage['answers']} answers, "
                      f"{stage['seconds_per_step']:.2f} s/step, "
                      f"loss {stage['loss_first_tenth']:.3f} -> {stage['loss_last_tenth']:.3f}")
    console.print(f"run folder {result.run_dir} ({result.metrics['total_seconds'] / 60:.1f} min)")
    if install:
        with status_console.status("installing and loading the default model with the new weights ..."):
            installed = install_run(result.run_dir)
            verify_installation()
        console.print(f"installed {len(installed)} files into {DEFAULT_WEIGHTS_DIR}; "
                      "load_model('default') applies them")
