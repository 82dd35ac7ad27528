"""`wb eval skipgpt` (its typer command function): perplexity on the test split, realised sparsity and
wall-clock against dense for a trained run, printed as a table and written as results.json and table.md."""

from __future__ import annotations

from pathlib import Path

import typer

from workbench.console import console, markdown_table
from workbench.errors import InputError
from workbench.output_paths import output_folder

TABLE_COLUMNS = ("model", "perplexity", "attention_skipped", "mlp_skipped", "modules_skipped", "forward_seconds",
                 "speedup")


def eval_command(
    run: Path = typer.Option(..., "--run", help="A finished `wb train skipgpt` run folder (either stage)."),
    blocks: int | None = typer.Option(None, "--blocks", min=1, help="Test blocks to score (default: all)."),
    block_size: int | None = typer.Option(None, "--block-size", min=2,
                                          help="Tokens per block (default: the run's recipe)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Blocks per forward for perplexity."),
    timing_blocks: int = typer.Option(4, "--timing-blocks", min=1,
                                      help="Test blocks to time, each prefilled alone (batch 1)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed forwards per model (the median is kept)."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda where a GPU is present."),
    out: Path = typer.Option(Path("runs/eval-skipgpt"), "--out", help="Results folder.", callback=output_folder),
    baselines: bool = typer.Option(False, "--baselines", help="Also static module pruning at the run's realised "
                                   "share and Mixture-of-Depths trained at its budget (minutes: it trains)."),
) -> None:
    """Perplexity, realised sparsity and measured speedup of a SkipGPT run against dense, on the test split."""
    import torch
    import yaml

    from efficient_models.skipgpt.evaluation import evaluate, load_skipgpt_run, rows_json
    from efficient_models.skipgpt.text_data import text_blocks
    from workbench.files import write_json_atomically, write_text_atomically

    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise InputError(f"--device {device!r}: choose cpu, or cuda on a machine with a GPU")
    loaded = load_skipgpt_run(run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else {}
    size = block_size or recipe.get("block_size", 256)
    test = text_blocks(loaded.tokenizer, "test", size, recipe.get("data_seed", 0))[:blocks]
    if not len(test):
        raise InputError(f"the test split has no block of {size} tokens")
    loaded.dense.to(device)
    loaded.routed.to(device)
    stage_file = run / "stage.yaml"
    stage = yaml.safe_load(stage_file.read_text()).get("stage", "?") if stage_file.is_file() else "?"
    label = f"skipgpt s={loaded.config.sparsity:g} ({stage})"
    rows, routing = evaluate(loaded, test, batch_size, timing_blocks, repeats, label)
    extra = {}
    if baselines:
        from efficient_models.skipgpt.baseline_eval import baseline_rows
        from efficient_models.skipgpt.training import load_recipe

        more, extra = baseline_rows(loaded, load_recipe(run / "recipe.yaml"), test, rows[-1].modules_skipped, out,
                                    batch_size, repeats)
        rows += more
    rows = rows_json(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "results.json", {
        "run": str(run), "data": "pydoc_data.topics test split", "blocks": len(test), "block_size": size,
        "timing_blocks": min(timing_blocks, len(test)), "device": device, "rows": rows,
        "routing": routing, **extra})
    table = markdown_table(rows, TABLE_COLUMNS, digits=3)
    write_text_atomically(out / "table.md", table)
    console.print(table)
    if baselines:
        console.print(f"baselines timed on a batch of {batch_size} blocks against dense in their own turns; "
                      f"Mixture-of-Depths' predictor agrees with its top-k on "
                      f"{extra['mixture_of_depths_predictor_agreement']:.1%} of decisions")
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'}")
