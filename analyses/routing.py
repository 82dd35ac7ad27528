"""Where a SkipGPT run spends compute: which (layer, module, token position) its routers run or skip.

The run's routed model (routers, and LoRA merged when trained) routes the test blocks of its text
(`pydoc_data.topics`, the split `wb train skipgpt` held out) by argmax, as at inference. Each batch's counts
of real tokens that ran each module, per layer and token position, are a resumable part of the run store;
the run folder ends with `routing.parquet` (layer, module, position, tokens, ran) and `summary.json`:

- the share skipped for attention and for the MLP (SkipGPT reports attention as the more redundant: the
  summary says whether this run agrees);
- per layer, the share skipped of each module;
- by token position (in `position_bins` equal bins of a block), the share skipped of each module, and whether
  later tokens skip less attention and more MLP than earlier ones (SkipGPT's other claim).

Text only: the visual-against-text split inside the MLLM is not measured here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from tqdm import tqdm

from efficient_models.skipgpt.evaluation import load_skipgpt_run
from efficient_models.skipgpt.text_data import text_blocks
from workbench.errors import InputError
from workbench.store import RunStore

MODULES = ("attention", "mlp")


@dataclass(frozen=True)
class RoutingConfig:
    blocks: int | None = 64  # test blocks to route (None: all)
    block_size: int | None = None  # None: the run's recipe's
    batch_size: int = 8
    position_bins: int = 8


def batch_counts(output, positions: int) -> pd.DataFrame:
    """Per (layer, module, position): real tokens and how many of them ran the module."""
    real = output.real.cpu()
    tokens = real.sum(0)
    rows = []
    for module, gates in zip(MODULES, (output.attention_gates, output.mlp_gates)):
        for layer, gate in enumerate(gates):
            ran = (gate.bool().cpu() & real).sum(0)
            rows += [{"layer": layer, "module": module, "position": position, "tokens": int(tokens[position]),
                      "ran": int(ran[position])} for position in range(positions)]
    return pd.DataFrame(rows)


def _skipped(table: pd.DataFrame, by: str | None = None) -> dict | float:
    sums = table[["tokens", "ran"]].sum() if by is None else table.groupby(by)[["tokens", "ran"]].sum()
    shares = 1 - sums["ran"] / sums["tokens"]
    return round(float(shares), 4) if by is None else [round(float(value), 4) for value in shares]


def summarise(table: pd.DataFrame, position_bins: int, block_size: int) -> dict:
    binned = table.assign(position=table["position"] * position_bins // block_size)
    summary = {"modules_skipped": _skipped(table)}
    for module in MODULES:
        rows = binned[binned["module"] == module]
        summary[f"{module}_skipped"] = _skipped(rows)
        summary[f"{module}_skipped_by_layer"] = _skipped(rows, "layer")
        summary[f"{module}_skipped_by_position"] = _skipped(rows, "position")
    summary["attention_more_redundant_than_mlp"] = summary["attention_skipped"] > summary["mlp_skipped"]
    early, late = (binned["position"] < position_bins // 2), (binned["position"] >= position_bins // 2)
    attention, mlp = binned["module"] == "attention", binned["module"] == "mlp"
    summary["later_tokens_skip_less_attention"] = (_skipped(binned[late & attention])
                                                   < _skipped(binned[early & attention]))
    summary["later_tokens_skip_more_mlp"] = _skipped(binned[late & mlp]) > _skipped(binned[early & mlp])
    return summary


@torch.no_grad()
def analyze_routing(run: Path, out: str | Path, config: RoutingConfig = RoutingConfig()) -> dict:
    """Route the test blocks with the run's routers; write the counts and the summary to a run store at `out`."""
    run = Path(run)
    loaded = load_skipgpt_run(run)
    recipe_path = run / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text()) if recipe_path.is_file() else {}
    size = config.block_size or recipe.get("block_size", 256)
    blocks = text_blocks(loaded.tokenizer, "test", size, recipe.get("data_seed", 0))[:config.blocks]
    if not len(blocks):
        raise InputError(f"the test split has no block of {size} tokens")
    identity = asdict(config) | {"run": str(run.resolve()), "block_size": size}
    store = RunStore.open(out, kind="routing", model=loaded.config.model,
                          data=f"pydoc_data.topics test split, {len(blocks)} blocks of {size} tokens", config=identity)
    starts = range(0, len(blocks), config.batch_size)
    for index, start in enumerate(tqdm(starts, desc="routing", unit="batch")):
        if not store.has_part("routing", index):
            output = loaded.routed(blocks[start:start + config.batch_size].to(loaded.routed.model.device), skip=True)
            store.write_part("routing", index, batch_counts(output, size))
    parts = pd.concat([store.read_part("routing", index)[0] for index in range(len(starts))])
    table = parts.groupby(["layer", "module", "position"], as_index=False)[["tokens", "ran"]].sum()
    store.write_table("routing", table)
    summary = {"run": str(run), "target_sparsity": loaded.config.sparsity, "blocks": len(blocks),
               **summarise(table, config.position_bins, size)}
    store.write_json("summary", summary)
    store.finish(num_llm_layers=loaded.routed.num_layers)
    return summary
