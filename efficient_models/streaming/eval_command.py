"""`wb eval streaming` (its typer command function): BLEU, AL, LAAL and compute of trained runs for several k
and offline, each run decoded the way it was trained or with the layouts asked for, written as results.json,
table.md, a BLEU-against-LAAL plot (bleu_laal.html, a curve per method: the method and its baselines in one
plot) and decoder FLOPs per emitted token against source length (compute.html).
"""

from __future__ import annotations

from pathlib import Path

import typer

from workbench.console import console, markdown_table
from workbench.errors import InputError
from workbench.output_paths import output_folder

TABLE_COLUMNS = ("method", "policy", "pairs", "BLEU", "AL", "LAAL", "GFLOPs_per_token", "forward_tokens_per_token")
AS_TRAINED = "trained"


def parse_wait_ks(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--wait-k {text!r}: give comma-separated whole numbers, e.g. 1,3,5,7") from None
    if not values or min(values) < 1:
        raise InputError(f"--wait-k {text!r}: give at least one k, each at least 1")
    return values


def parse_layouts(text: str) -> list[str] | None:
    """The layouts asked for, or None for each run's own (`trained`)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    return None if names == [AS_TRAINED] else names


def bleu_laal_figure(rows: list[dict]):
    """BLEU against LAAL, one curve per method and run, a point per policy."""
    import plotly.graph_objects as go

    curves = dict.fromkeys((row["run"], row["method"]) for row in rows)
    runs_per_method = {method: sum(other == method for _, other in curves) for _, method in curves}
    figure = go.Figure()
    for run, method in curves:
        points = sorted((row for row in rows if (row["run"], row["method"]) == (run, method)),
                        key=lambda row: row["LAAL"])
        name = method if runs_per_method[method] == 1 else f"{method} ({Path(run).name})"
        figure.add_trace(go.Scatter(x=[row["LAAL"] for row in points], y=[row["BLEU"] for row in points],
                                    text=[row["policy"] for row in points], mode="lines+markers+text", name=name))
    figure.update_layout(xaxis_title="LAAL (source words)", yaxis_title="BLEU")
    return figure


def compute_figure(rows: list[dict]):
    """Decoder GFLOPs per emitted token against source length, a curve per method and policy."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for row in rows:
        bins = row["compute_by_source_length"]
        figure.add_trace(go.Scatter(x=list(bins), y=list(bins.values()), mode="lines+markers",
                                    name=f"{row['method']}, {row['policy']}"))
    figure.update_layout(xaxis_title="source length (words)", yaxis_title="decoder GFLOPs per emitted token")
    return figure


def eval_command(
    run: list[Path] = typer.Option(..., "--run", help="A finished `wb train streaming` run folder; repeat it to "
                                                      "put the method and its baselines in one table and plot."),
    wait_k: str = typer.Option("1,3,5,7", "--wait-k", help="Comma-separated k to decode with."),
    layouts: str = typer.Option(AS_TRAINED, "--layouts",
                                help="trained (each run decoded as it was trained: group -> group, batch -> "
                                     "reencode, interleaved -> interleaved) or comma-separated decodings for every "
                                     "run: group (the method), interleaved (one cache in arrival order), reencode "
                                     "(the batch layout encoded afresh at each READ); the ablation's fix-none, "
                                     "fix-input, fix-output, fix-positions (arrival order with one mismatch fixed)."),
    offline: bool = typer.Option(True, "--offline/--no-offline", help="Also translate full sentences."),
    n: int = typer.Option(100, "--n", min=1, help="Test pairs of the task's fixed test split."),
    jobs: int = typer.Option(1, "--jobs", min=1, help="Decodings run at once, each in its own process with its "
                                                      "share of the cores (one sentence at a time uses one core "
                                                      "well); e.g. the number of cores."),
    out: Path = typer.Option(Path("runs/eval-streaming"), "--out", help="Results folder.", callback=output_folder),
) -> None:
    """Translate the task's test pairs while reading: sacreBLEU, AL and LAAL for each wait-k and offline."""
    from efficient_models.streaming.eval_jobs import EvalJob, run_jobs
    from efficient_models.streaming.evaluation import (
        DECODED_AS_TRAINED, LAYOUT_NAMES, OFFLINE, finished_run_config,
    )
    from workbench.files import write_json_atomically, write_text_atomically

    wait_ks = parse_wait_ks(wait_k) + ([OFFLINE] if offline else [])
    asked = parse_layouts(layouts)
    unknown = [name for name in asked or [] if name not in LAYOUT_NAMES]
    if unknown:
        raise InputError(f"unknown layout {unknown[0]!r}; choose from {AS_TRAINED}, {', '.join(LAYOUT_NAMES)}")
    configs = {run_dir: finished_run_config(run_dir) for run_dir in run}  # every run checked before any decoding
    planned = [EvalJob(run_dir, layout, k, n) for run_dir, config in configs.items()
               for layout in asked or [DECODED_AS_TRAINED[config.training_layout]] for k in wait_ks]
    runs = [{"run": str(run_dir), "training_layout": config.training_layout, "trained_wait_k": config.wait_k,
             "training_wait_ks": config.training_wait_ks}
            for run_dir, config in configs.items()]
    out.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> None:
        # After each job, so that a later failure or Ctrl-C keeps what was measured.
        write_json_atomically(out / "results.json", {"runs": runs, "rows": rows})
        write_text_atomically(out / "table.md", markdown_table(rows, TABLE_COLUMNS, digits=2))
        write_text_atomically(out / "bleu_laal.html", bleu_laal_figure(rows).to_html(include_plotlyjs="cdn"))
        write_text_atomically(out / "compute.html", compute_figure(rows).to_html(include_plotlyjs="cdn"))

    rows = run_jobs(planned, jobs, write)
    console.print(markdown_table(rows, TABLE_COLUMNS, digits=2))
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'bleu_laal.html'}, "
                  f"{out / 'compute.html'}")
