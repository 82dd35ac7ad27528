"""`wb analyze vica-layers`: the command over `analyses.vica_layers`, mounted by `analyses/analyze_commands.py`.

It prints one row per decoder layer (what cutting text->visual attention there costs, the proxies, the chosen
layers) and how well each proxy ranks the layers as the direct measure does.
"""

from __future__ import annotations

import json

import typer
from rich.table import Table

from workbench.console import MODEL_OPTION, console, load_with_notes
from workbench.output_paths import output_folder


def vica_layers(
    model: str = MODEL_OPTION,
    out: str = typer.Option(..., "--out", help="Run folder; the same command resumes it.", callback=output_folder),
    questions: int = typer.Option(16, min=1, help="Probe-scene questions, teacher-forced with their answers."),
    split: str = typer.Option("val", help="Probe-scene split the questions come from."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Cut text->visual attention one layer at a time: the layers ViCA's text should cross-attend at."""
    import pandas as pd

    from analyses.vica_layers import VicaLayersConfig, analyze_vica_layers

    config = VicaLayersConfig(questions=questions, split=split, batch_size=batch_size)
    summary = analyze_vica_layers(load_with_notes(model), out, config)
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    layers = pd.read_parquet(f"{out}/layers.parquet")
    chosen = set(summary["chosen"].get(8, summary["ranking"][:8]))
    intact, blind = summary["intact"], summary["text_blind"]
    table = Table("layer", "loss +", "log-prob -", "accuracy -", "attention mass", "vision effect", "chosen (8)",
                  title=f"text->visual attention cut at one layer, {summary['questions']} {summary['split']} "
                        f"questions -> {out}",
                  caption=f"intact: loss {intact['loss']:.3f}, accuracy {intact['accuracy']:.0%}; cut at every "
                          f"layer: loss {blind['loss']:.3f}, accuracy {blind['accuracy']:.0%}")
    for row in layers.itertuples():
        table.add_row(str(row.layer), f"{row.loss_increase:+.4f}", f"{row.logprob_drop:+.4f}",
                      f"{row.accuracy_drop:+.1%}", f"{row.attention_mass:.3f}", f"{row.vision_effect:.4f}",
                      "*" if row.layer in chosen else "")
    console.print(table)
    agreement = Table("proxy", "Spearman vs loss +", *(f"top-{k} overlap" for k in summary["chosen"]),
                      title="how well each proxy ranks the layers")
    for row in summary["agreement"]:
        agreement.add_row(row["proxy"], f"{row['spearman']:+.2f}",
                          *(f"{row[f'top{k}_overlap']:.0%}" for k in summary["chosen"]))
    console.print(agreement)
