"""What a run folder's metrics.json says about the machine, the package versions and the loss curve."""

from __future__ import annotations

import contextlib
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.training.loop import TrainingRecord

LOSS_CURVE_POINTS = 20


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, Any]:
    return {"device": device.type, "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def loss_curve(losses: list[float]) -> list[dict[str, float]]:
    """Mean loss over about LOSS_CURVE_POINTS equal spans of steps, each labelled with its last step."""
    span = max(1, math.ceil(len(losses) / LOSS_CURVE_POINTS))
    return [{"step": min(start + span, len(losses)), "loss": round(float(np.mean(losses[start:start + span])), 4)}
            for start in range(0, len(losses), span)]


def loss_summary(record: TrainingRecord) -> dict[str, Any]:
    """Steps, time and the loss at the start and end of a stage (mean over its first and last tenth)."""
    tenth = max(1, len(record.losses) // 10)
    return {"steps": len(record.losses), "seconds": round(sum(record.seconds), 1),
            "seconds_per_step": round(sum(record.seconds) / max(1, len(record.seconds)), 3),
            "median_step_seconds": round(record.median_step_seconds, 3),
            "loss_first_tenth": round(float(np.mean(record.losses[:tenth])), 4),
            "loss_last_tenth": round(float(np.mean(record.losses[-tenth:])), 4),
            "loss_curve": loss_curve(record.losses)}
