"""The efficient models' commands, made from the registry: `wb train <method>`, `wb export-config`, `wb bench`.

Each is a factory, so that a command's help lists the methods and variants registered when the command
line is built (`wb.cli.build_app`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.progress import Progress

from efficient_models.registry import methods, variants
from workbench.console import MODEL_OPTION, console, status_console
from workbench.errors import InputError
from workbench.output_paths import output_file, output_folder

DEFAULT_VARIANTS = "dense,fastv,pdrop"


def train_commands() -> Iterator[tuple[str, Callable[..., None], str]]:
    """(name, typer command function, one-line help) of every method that has a training entry."""
    for name, method in methods().items():
        if method.train is not None:
            yield name, method.train, f"{(method.train.__doc__ or method.summary).strip().splitlines()[0]}"


def eval_commands() -> Iterator[tuple[str, Callable[..., None], str]]:
    """(name, typer command function, one-line help) of every method's evaluations; a name is taken once."""
    taken = set()
    for method in methods().values():
        for name, command in method.evaluations:
            if name in taken:
                raise ValueError(f"evaluation {name!r} is registered by two methods")
            taken.add(name)
            yield name, command, (command.__doc__ or method.summary).strip().splitlines()[0]


def export_command() -> Callable[..., None]:
    from efficient_models.export import exportable_methods

    sources = "; ".join(f"{name} ({kinds} run)" for name, kinds in exportable_methods().items())

    def export_config(
        run: Path = typer.Option(..., "--run", help="A finished analysis run folder."),
        method: str = typer.Option(..., "--method", help=f"The method, and the runs it is exported from: {sources}."),
        out: Path = typer.Option(..., "--out", help="The YAML file to write.", callback=output_file),
        token_budget: float | None = typer.Option(
            None, "--token-budget", min=0.0, max=1.0,
            help="Refit the config to this share of dense visual-token-layers (e.g. 0.1, like HiDrop's Tok48), for "
                 f"the methods that can: {', '.join(name for name, m in methods().items() if m.fit_budget)}."),
    ) -> None:
        """Write what a run found as a validated, versioned config for an efficient model."""
        from efficient_models.export import build_config
        from efficient_models.registry import count_flops, load_config
        from workbench.configs import write_config
        from workbench.flops import DEFAULT_MODEL_SHAPES as SHAPES

        config = build_config(run, method)
        if token_budget is not None:
            fit = methods()[method].fit_budget
            if fit is None:
                raise InputError(f"--token-budget does not apply to --method {method}")
            config = fit(config, token_budget)
            share = count_flops(config, SHAPES, 1).average_visual_tokens / SHAPES.visual_tokens_per_image
            console.print(f"fitted to {token_budget:.1%} of dense visual-token-layers ({share:.1%} on the default "
                          "model's 256 visual tokens)")
        path = write_config(config, out, header=f"{method} config exported by `wb export-config` from {run}")
        load_config(path)  # what training will read must validate
        console.print(f"wrote {path}")

    return export_config


def bench_command() -> Callable[..., None]:
    listed = ", ".join(f"{name} ({variant.summary})" for name, variant in variants().items())

    def bench(
        ctx: typer.Context,
        variant_list: str = typer.Option(DEFAULT_VARIANTS, "--variants", help=f"Comma-separated: {listed}."),
        runs: list[Path] = typer.Option([], "--run", help="A finished `wb train METHOD` run folder (repeatable): "
                                                           "variants of that method use it."),
        configs: list[Path] = typer.Option([], "--config", help="A method's config YAML (repeatable), for the "
                                                                 "variants that take one (default: a run's own)."),
        n: int = typer.Option(120, "--n", min=1, help="Probe-scene questions for accuracy."),
        split: str = typer.Option("test", help="train, val or test."),
        batch_size: int = typer.Option(8, min=1, help="Questions per batch; the timed batch is the first one."),
        repeats: int = typer.Option(5, min=1, help="Timed repeats (medians are reported)."),
        decode_steps: int = typer.Option(16, min=1, help="Greedy steps timed for decode throughput."),
        out: Path = typer.Option(Path("runs/bench"), "--out", callback=output_folder,
                                 help="Folder for bench.json and the accuracy-vs-FLOPs plot."),
        model: str = MODEL_OPTION,
    ) -> None:
        """Variants against dense on the same inputs: accuracy, counted FLOPs, speed and memory ratios to dense."""
        if ctx.invoked_subcommand is not None:
            return
        from efficient_models.bench.harness import run_probe_benchmark
        from efficient_models.bench.results import print_report, write_report
        from efficient_models.bench.variants import build_variants

        names = [name.strip() for name in variant_list.split(",") if name.strip()]
        with status_console.status(f"loading {model} for {', '.join(names) or 'no variant'} ..."):
            built = build_variants(names, model, configs=configs, runs=runs)
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

    return bench
