"""`wb eval streaming` (its typer command function): BLEU, AL, LAAL and compute of a trained run for several k
and offline, decoded with group positions and the baselines' layouts, written as results.json, table.md and a
BLEU-against-LAAL plot (bleu_laal.html), one curve per method.
"""

from __future__ import annotations

from pathlib import Path

import typer

from workbench.console import console, markdown_table
from workbench.errors import InputError
from workbench.output_paths import output_folder

TABLE_COLUMNS = ("method", "policy", "pairs", "BLEU", "AL", "LAAL", "forward_tokens_per_token")


def parse_wait_ks(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--wait-k {text!r}: give comma-separated whole numbers, e.g. 1,3,5,7") from None
    if not values or min(values) < 1:
        raise InputError(f"--wait-k {text!r}: give at least one k, each at least 1")
    return values


def bleu_laal_figure(rows: list[dict]):
    """BLEU against LAAL, one curve per method, a point per policy."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted((row for row in rows if row["method"] == method), key=lambda row: row["LAAL"])
        figure.add_trace(go.Scatter(x=[row["LAAL"] for row in points], y=[row["BLEU"] for row in points],
                                    text=[row["policy"] for row in points], mode="lines+markers+text", name=method))
    figure.update_layout(xaxis_title="LAAL (source words)", yaxis_title="BLEU")
    return figure


def eval_command(
    run: Path = typer.Option(..., "--run", help="A finished `wb train streaming` run folder."),
    wait_k: str = typer.Option("1,3,5,7", "--wait-k", help="Comma-separated k to decode with."),
    layouts: str = typer.Option("group,interleaved,reencode", "--layouts",
                                help="Comma-separated decodings: group (the method), interleaved (one cache in "
                                     "arrival order), reencode (the batch layout encoded afresh at each READ); the "
                                     "ablation's fix-none, fix-input, fix-output, fix-positions (arrival order with "
                                     "one mismatch fixed)."),
    offline: bool = typer.Option(True, "--offline/--no-offline", help="Also translate full sentences."),
    n: int = typer.Option(100, "--n", min=1, help="Test pairs of the task's fixed test split."),
    out: Path = typer.Option(Path("runs/eval-streaming"), "--out", help="Results folder.", callback=output_folder),
) -> None:
    """Translate the task's test pairs while reading: sacreBLEU, AL and LAAL for each wait-k and offline."""
    import yaml

    from efficient_models.streaming.evaluation import OFFLINE, evaluate, load_streaming_run
    from efficient_models.streaming.task import make_splits
    from workbench.files import write_json_atomically, write_text_atomically

    wait_ks = parse_wait_ks(wait_k) + ([OFFLINE] if offline else [])
    config, model, tokenizer = load_streaming_run(run)
    task_seed = yaml.safe_load((run / "recipe.yaml").read_text()).get("task_seed", 0)
    _, test = make_splits(seed=task_seed, train_size=0)
    trained = f"{config.training_layout}-trained"
    rows = evaluate(model, tokenizer, config, test[:n], wait_ks, [name.strip() for name in layouts.split(",")],
                    model_name=f", {trained}")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "results.json", {"run": str(run), "trained_wait_k": config.wait_k, "rows": rows})
    table = markdown_table(rows, TABLE_COLUMNS, digits=2)
    write_text_atomically(out / "table.md", table)
    write_text_atomically(out / "bleu_laal.html", bleu_laal_figure(rows).to_html(include_plotlyjs="cdn"))
    console.print(table)
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'bleu_laal.html'}")

