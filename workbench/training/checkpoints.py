"""Checkpoints of a training run: trainable weights and AdamW state as safetensors, the position as JSON.

A checkpoint folder holds one tensor file named after its step and `state.json`, which points at it.
The tensors are written first under their own name, then the JSON (the commit point), so a run killed
at any moment resumes from the last complete checkpoint. No pickle anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.errors import InputError
from workbench.files import write_atomically, write_json_atomically

ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
STATE_FILE = "state.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat named tensors (the optimizer has one group, in `names` order)."""
    state = optimizer.state_dict()["state"]
    return {f"adam/{key}/{name}": state[index][key].contiguous()
            for index, name in enumerate(names) if index in state for key in ADAM_STATE_KEYS}


def save_checkpoint(folder: Path, step: int, record: Mapping[str, Any], parameters: Mapping[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer) -> None:
    """Weights and AdamW state after `step` steps, and `record` (JSON) describing the run so far."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{name}": parameter.detach().cpu().contiguous() for name, parameter in parameters.items()}
    tensors |= {key: value.cpu() for key, value in optimizer_tensors(optimizer, list(parameters)).items()}
    tensor_file = f"step{step:06d}.safetensors"
    write_atomically(folder / tensor_file, lambda target: save_file(tensors, str(target)))
    write_json_atomically(folder / STATE_FILE, {"tensors": tensor_file, "record": dict(record)})
    for stale in folder.glob("*.safetensors"):
        if stale.name != tensor_file:
            stale.unlink()


def has_checkpoint(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def restore_checkpoint(folder: Path, parameters: Mapping[str, nn.Parameter],
                       optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the checkpoint's weights and AdamW state into `parameters` and `optimizer`; returns its record."""
    saved = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(folder / saved["tensors"])
    unknown = sorted({key.split("/", 1)[1] for key in tensors if key.startswith("param/")} - set(parameters))
    if unknown:
        raise InputError(f"the checkpoint in {folder} has weights for {unknown[0]}, which this run does not train")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[f"param/{name}"])
    names = list(parameters)
    state = {index: {key: tensors[f"adam/{key}/{name}"] for key in ADAM_STATE_KEYS}
             for index, name in enumerate(names) if f"adam/step/{name}" in tensors}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return saved["record"]
