"""The `wb` command line, mounted from the floors: each floor owns its commands, this root puts them together.

- workbench: `inspect`, `models`, `data`, `eval`, `bench trace`, `train default`;
- efficient_models: `train <method>`, `eval <name>` and `bench` for every registered method, `export-config`;
- analyses: `analyze ...`;
- apps: `app`;
- the root itself: `support-table`, which reads every floor's registry.
Every `WorkbenchError`, and every OS error (a path that cannot be read or written), ends the command with
one line on stderr and exit code 2; tracebacks are kept for real bugs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from analyses.analyze_commands import analyze_app
from apps.app_command import serve
from efficient_models.method_commands import bench_command, eval_commands, export_command, train_commands
from workbench import core_commands as core
from workbench.errors import WorkbenchError


def build_app() -> typer.Typer:
    """The command line as the registry stands now (a method registered later needs a new build)."""
    app = typer.Typer(help="Multimodal LLM workbench: look inside vision-language models and slim them down.",
                      no_args_is_help=True, pretty_exceptions_enable=False)
    app.command()(core.inspect)
    app.add_typer(core.models_app, name="models")
    app.add_typer(core.data_app, name="data")
    eval_app = typer.Typer(help="Evaluations: VQA accuracy on held-out probe scenes, and each method's own.",
                           no_args_is_help=True)
    eval_app.command("vqa")(core.eval_vqa)
    for name, command, summary in eval_commands():
        eval_app.command(name, help=summary)(command)
    app.add_typer(eval_app, name="eval")

    train_app = typer.Typer(help="Training: the default model's recipe and every method's training entry.",
                            no_args_is_help=True)
    train_app.command("default")(core.train_default)
    for name, command, summary in train_commands():
        train_app.command(name, help=summary)(command)
    app.add_typer(train_app, name="train")

    bench_app = typer.Typer(help="Benchmarks that print ratios measured in one run.")
    bench_app.callback(invoke_without_command=True)(bench_command())
    bench_app.command("trace")(core.bench_trace)
    app.add_typer(bench_app, name="bench")

    app.command("export-config")(export_command())
    app.add_typer(analyze_app, name="analyze")
    app.command("app")(serve)
    app.command("support-table")(support_table)
    return app


def support_table(
    readme: Path | None = typer.Option(None, "--readme", help="Rewrite the table between this file's "
                                       "support-table markers instead of printing it."),
) -> None:
    """Which architectures inspect, the analyses, the app, schedules and each method run on, from the registries."""
    from wb.support_table import render_table, rewrite_readme

    if readme is None:
        print(render_table())
    else:
        print(f"{readme}: support table {'rewritten' if rewrite_readme(readme) else 'already current'}")


def main() -> None:
    try:
        build_app()()
    except WorkbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a path the command could not read or write: a folder, no permission, a full disk
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}; check the path and its permissions", file=sys.stderr)
        sys.exit(2)
