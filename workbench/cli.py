"""The `wb` command line: inspect a model on an image, build the default model, benchmarks, data.

Every `WorkbenchError` ends the command with one line on stderr and exit code 2; tracebacks
are kept for real bugs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.progress import Progress
from rich.table import Table

from analyses.cli import analyze_app
from workbench.console import MODEL_OPTION, console, load_with_notes, status_console
from workbench.errors import WorkbenchError

app = typer.Typer(help="Multimodal LLM workbench: look inside vision-language models and slim them down.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Build and describe models.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print ratios measured in one run.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: probe scenes with ground truth.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")
eval_app = typer.Typer(help="Evaluations: accuracy on held-out probe scenes.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
train_app = typer.Typer(help="Training recipes that produce the weights the workbench ships.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(analyze_app, name="analyze")


@app.command()
def inspect(
    image: str = typer.Argument(..., help="An image path, sample:NAME (astronaut, chelsea, coffee, rocket, china, flower) or probe:SPLIT:INDEX."),
    model: str = MODEL_OPTION,
    prompt: str = typer.Option("Describe the image.", "--prompt", "-p"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    max_new_tokens: int = typer.Option(40, help="Length limit of the answer."),
) -> None:
    """How a model sees one image: visual tokens, answer, norms per layer, nearest vocabulary tokens."""
    from workbench.data.images import load_image
    from workbench.inspection import inspect_image

    picture = load_image(image)
    loaded = load_with_notes(model)
    with status_console.status("tracing ..."):
        report = inspect_image(loaded, picture, prompt, max_new_tokens=max_new_tokens)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    console.print(f"[bold]{image}[/] on [bold]{report.model}[/]: {report.num_visual_tokens} visual tokens "
                  f"in a {report.grid[0]}x{report.grid[1]} grid")
    console.print(f"[bold]prompt:[/] {report.prompt}\n[bold]answer:[/] {report.answer}")
    norms = Table("layer", "visual mean norm", "text mean norm", title="Mean hidden-state norm per LLM layer")
    for row in report.layer_norms:
        norms.add_row(row.layer, f"{row.visual:.2f}", f"{row.text:.2f}")
    console.print(norms)
    nearest = Table("token", "row", "col", "norm", "nearest vocabulary tokens (cosine)",
                    title="Visual tokens read against the input embeddings")
    for token in report.nearest_tokens:
        words = ", ".join(f"{word!r} {score:.2f}" for word, score in token.neighbours)
        nearest.add_row(str(token.index), str(token.row), str(token.col), f"{token.norm:.2f}", words)
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


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    variants: str = typer.Option("dense,fastv,pdrop", help="Comma-separated: dense, fastv, pdrop, fastv-matched "
                                                           "(FastV at HiDrop's visual tokens per layer), hidrop "
                                                           "(trained run), hidrop-dropin (its schedule, dense weights)."),
    hidrop_run: Path | None = typer.Option(None, "--hidrop-run", help="A finished `wb train hidrop` run folder."),
    hidrop_config: Path | None = typer.Option(None, "--hidrop-config",
                                              help="HiDrop config YAML for hidrop-dropin and fastv-matched "
                                                   "(default: the run's config.yaml)."),
    n: int = typer.Option(120, "--n", min=1, help="Probe-scene questions for accuracy."),
    split: str = typer.Option("test", help="train, val or test."),
    batch_size: int = typer.Option(8, min=1, help="Questions per batch; the timed batch is the first one."),
    repeats: int = typer.Option(5, min=1, help="Timed repeats (medians are reported)."),
    decode_steps: int = typer.Option(16, min=1, help="Greedy steps timed for decode throughput."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for bench.json and the accuracy-vs-FLOPs plot."),
    model: str = MODEL_OPTION,
) -> None:
    """Dense vs token schedules on the same inputs: accuracy, counted FLOPs, speed and memory ratios to dense."""
    if ctx.invoked_subcommand is not None:
        return
    from efficient_models.bench import build_variants, print_report, run_probe_benchmark, write_report

    names = [name.strip() for name in variants.split(",") if name.strip()]
    with status_console.status(f"loading {model} for {', '.join(names)} ..."):
        built = build_variants(names, model, hidrop_run, hidrop_config)
    with Progress(console=status_console, transient=True) as progress:
        task = progress.add_task("benchmark", total=None)
        report = run_probe_benchmark(built, split=split, n=n, batch_size=batch_size, repeats=repeats,
                                     decode_steps=decode_steps,
                                     progress=lambda stage, done, total: progress.update(
                                         task, description=stage, completed=done, total=total))
    for note in report.notes:
        status_console.print(f"[yellow]note:[/] {note}")
    print_report(report, console)
    json_path, plot_path = write_report(report, out)
    console.print(f"wrote {json_path} and {plot_path}")


@bench_app.command("trace")
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
    out: Path = typer.Option(..., help="Folder for the PNGs and scenes.jsonl."),
) -> None:
    """Write probe scenes (PNG) and their ground truth (JSONL) for a person to look at."""
    from workbench.data.probe_scenes import write_probe_scenes

    path = write_probe_scenes(out, n=n, seed=seed, split=split)
    console.print(f"wrote {n} scenes and {path}")


@eval_app.command("vqa")
def eval_vqa(
    model: str = MODEL_OPTION,
    split: str = typer.Option("test", help="train, val or test."),
    n: int = typer.Option(500, min=1, help="How many questions, balanced over question types."),
    batch_size: int = typer.Option(8, min=1),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Exact-match accuracy on probe-scene questions, next to no-vision and majority-answer references."""
    from workbench.evaluation.vqa import evaluate_vqa

    loaded = load_with_notes(model)
    with Progress(console=status_console, transient=True) as progress:
        task = progress.add_task("answering (model, then no vision)", total=2 * n)
        report = evaluate_vqa(loaded, split=split, n=n, batch_size=batch_size,
                              progress=lambda done, total: progress.update(task, completed=done, total=total))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    scores = Table("type", "n", "model", "no vision", "majority",
                   title=f"VQA exact match: {report.model} on {report.n} {report.split} questions "
                         f"({report.seconds:.0f} s)")
    for name, row in [*report.by_type.items(), ("overall", report.overall)]:
        if name == "overall":
            scores.add_section()
        scores.add_row(name, str(row.n), f"{row.model:.1%}", f"{row.no_vision:.1%}", f"{row.majority:.1%}")
    console.print(scores)
    examples = Table("question", "answer", "model", "no vision", title="First example of each type")
    for first, *_ in report.examples.values():
        examples.add_row(first.question, first.answer, repr(first.prediction), repr(first.no_vision_prediction))
    console.print(examples)


@train_app.command("default")
def train_default(
    config: Path | None = typer.Option(None, "--config", help="Recipe YAML (default: the shipped recipe)."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: runs/train-default, "
                                                        "runs/train-default-smoke with --smoke)."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="Continue from the run folder's last checkpoint, or start over."),
    install: bool = typer.Option(False, "--install", help="Copy the finished run's weights to where "
                                                          "load_model('default') applies them."),
    smoke: bool = typer.Option(False, "--smoke", help="4 steps per stage on 8 scenes: checks wiring, times steps."),
) -> None:
    """Train the default model: projector on captions, then projector + LoRA on questions (about an hour on 2 cores)."""
    from workbench.models.default_model import DEFAULT_WEIGHTS_DIR
    from workbench.recipes.config import DEFAULT_RECIPE, RecipeError, load_recipe, smoke_recipe
    from workbench.recipes.default_model import install_run, train_default_model, verify_installation

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


@train_app.command("hidrop")
def train_hidrop(
    config: Path = typer.Option(..., "--config", help="A hidrop config from `wb export-config --method hidrop`."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Fine-tuning recipe YAML (default: the shipped one)."),
    init: str = typer.Option("dense", "--init", help="dense: start from the trained default model."),
    out: Path = typer.Option(Path("runs/train-hidrop"), "--out", help="Run folder."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint, or start over."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override the recipe's number of steps."),
    smoke: bool = typer.Option(False, "--smoke", help="4 steps on 8 scenes: checks the wiring, times steps."),
) -> None:
    """Fine-tune the default model (projector + LoRA) with a HiDrop schedule active."""
    from efficient_models.hidrop_training import DEFAULT_RECIPE, load_recipe, smoke_recipe, train_hidrop
    from workbench.configs import HiDropConfig, load_config

    schedule_config = load_config(config)
    if not isinstance(schedule_config, HiDropConfig):
        raise WorkbenchError(f"{config} is a {schedule_config.method!r} config; `wb train hidrop` needs a hidrop one")
    settings = load_recipe(recipe or DEFAULT_RECIPE)
    if init != settings.init:
        raise WorkbenchError(f"--init {init!r} is not available; the recipe starts from {settings.init!r}")
    if steps is not None:
        settings = settings.model_copy(update={"optimisation": settings.optimisation.model_copy(update={"steps": steps})})
    settings = smoke_recipe(settings) if smoke else settings
    try:
        run = train_hidrop(schedule_config, settings, out, resume=resume)
    except KeyboardInterrupt:
        status_console.print(f"interrupted; `wb train hidrop --config {config} --out {out}` continues")
        raise typer.Exit(130) from None
    record = run.result.record
    console.print(f"{run.schedule.describe(run.num_visual)}: {record.step} steps, "
                  f"median {run.result.median_step_seconds:.2f} s/step, loss {record.losses[0]:.3f} -> "
                  f"{record.losses[-1]:.3f}; run folder {run.run_dir}")


@app.command("export-config")
def export_config(
    run: Path = typer.Option(..., "--run", help="A finished analysis run folder."),
    method: str = typer.Option(..., "--method", help="prune (tokens run), injection (alignment or similarity run), "
                                                     "hidrop or vica (similarity run)."),
    out: Path = typer.Option(..., "--out", help="The YAML file to write."),
    token_budget: float | None = typer.Option(
        None, "--token-budget", min=0.0, max=1.0,
        help="hidrop: keep the run's entry and exit layers and fit a concave schedule to this share of dense "
             "visual-token-layers (e.g. 0.1, like HiDrop's Tok48)."),
) -> None:
    """Write what a run found as a validated, versioned config for an efficient model."""
    from workbench.configs import build_config, load_config, write_config

    config = build_config(run, method)
    if token_budget is not None:
        from efficient_models.schedule import from_config, with_token_budget

        if method != "hidrop":
            raise WorkbenchError("--token-budget applies to --method hidrop")
        config = with_token_budget(config, token_budget)
        share = from_config(config).token_layer_fraction(576)
        console.print(f"concave schedule, power {config.schedule_power}: {share:.1%} of dense visual-token-layers")
    path = write_config(config, out)
    load_config(path)  # what training will read must validate
    console.print(f"wrote {path}")


@app.command("app")
def browser_app(
    port: int = typer.Option(8501, "--port", help="Port to serve on (localhost)."),
    model: str = MODEL_OPTION,
    headless: bool = typer.Option(True, "--headless/--open-browser", help="Only print the URL, or also open a browser."),
) -> None:
    """The browser app (Streamlit): explore token categories, layers and runs, export configs."""
    import importlib.util
    import os
    import subprocess

    script = importlib.util.find_spec("apps.workbench_app").origin
    console.print(f"workbench app on [bold]http://localhost:{port}[/] (model {model}); Ctrl-C stops it")
    argv = [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(port),
            "--server.address", "localhost", "--server.headless", str(headless).lower(),
            "--browser.gatherUsageStats", "false"]
    try:
        code = subprocess.call(argv, env=os.environ | {"WB_APP_MODEL": model})
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except WorkbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
