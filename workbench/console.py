"""What every `wb` command shares: the two consoles, the --model option, loading with notes, Markdown tables.

Results go to stdout (`console`); notes, spinners and progress go to stderr (`status_console`),
so that `--json` output on stdout stays parseable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import typer
from rich.console import Console

console = Console()
status_console = Console(stderr=True)

MODEL_OPTION = typer.Option("default", "--model", "-m", help="'default', a local folder or a Hugging Face id.")


def load_with_notes(name: str, **options):
    """`load_model(name, **options)` behind a spinner, printing the model's notes (e.g. untrained weights)."""
    from workbench.models.loading import load_model

    with status_console.status(f"loading model {name} ..."):
        loaded = load_model(name, **options)
    for note in loaded.notes:
        status_console.print(f"[yellow]note:[/] {note}")
    return loaded


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], digits: int = 2) -> str:
    """`rows`' `columns` as a Markdown table (the `table.md` results folders keep), floats to `digits` places."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[key]:.{digits}f}" if isinstance(row[key], float) else str(row[key]) for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
