"""`wb eval reasoning`'s table: each model's accuracy and length beside the first model's (the verbose
reasoner, when it is listed first), and each run's training cost per step, as its run folder recorded it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

COLUMNS = ("model", "pass@1", "accuracy_change", "mean_tokens", "length_ratio", "median_tokens", "share_truncated",
           "train_seconds_per_step", "train_peak_memory_mb")


def training_costs(source: str) -> dict:
    """Seconds per step and peak memory (MB) from a run folder's metrics.json; None for what it lacks."""
    metrics_path = Path(source) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    seconds = metrics.get("seconds_per_step", metrics.get("train", {}).get("seconds_per_step"))
    return {"train_seconds_per_step": seconds, "train_peak_memory_mb": metrics.get("peak_memory_mb")}


def compared_to_first(results: Sequence[dict]) -> list[dict]:
    """Each result with its pass@1 change (points) and mean-length ratio against the first result."""
    first = results[0]
    return [result | {"accuracy_change": round(100 * (result["pass@1"] - first["pass@1"]), 2),
                      "length_ratio": round(result["mean_tokens"] / first["mean_tokens"], 3)
                      if first["mean_tokens"] else None}
            for result in results]
