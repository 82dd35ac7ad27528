"""Timing and memory of one variant, through the `BenchVariant` interface only.

Timed runs interleave the variants within each repeat (dense, a, b, dense, a, b, ...) so that drift in
machine speed hits all of them alike. The training step computes in the precision training would
(`workbench.training.precision`: by default bf16 autocast where the device has native bf16, else fp32).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch

from efficient_models.variant import BenchVariant
from workbench.models.loading import LoadedModel
from workbench.training.precision import Precision, autocast, resolve_precision

CUDA_PEAK = "cuda_peak_allocated_during_prefill"  # max_memory_allocated above what was allocated before
KV_CACHE = "kv_cache_bytes_after_prefill"


def timed(device: torch.device, run: Callable[[], object]) -> float:
    """Wall seconds of `run()`, waiting for queued GPU work before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


@contextmanager
def trainable(loaded: LoadedModel):
    """Projector and LLM weights require grad and the vision tower's do not, as when fine-tuning over a frozen
    tower; the flags are restored and the gradients dropped on the way out."""
    flags = {parameter: parameter.requires_grad for parameter in loaded.model.parameters()}
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(True)
    for parameter in loaded.adapter.vision_tower.parameters():
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        loaded.model.zero_grad(set_to_none=True)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


def prefill_seconds(variant: BenchVariant, inputs: Mapping[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return timed(variant.loaded.device, lambda: variant.prefill(inputs))


def decode_tokens_per_second(variant: BenchVariant, inputs: Mapping[str, torch.Tensor], steps: int) -> float:
    with torch.no_grad():
        prefilled = variant.prefill(inputs)
        seconds = timed(variant.loaded.device, lambda: variant.decode(prefilled, steps))
    return len(prefilled.token) * steps / seconds


def training_step(variant: BenchVariant, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  precision: Precision = "auto") -> torch.Tensor:
    """Forward (in `precision`, as the training loop runs it) and backward of the answer tokens' cross entropy
    (no optimizer step); returns the loss."""
    device = variant.loaded.device
    with autocast(resolve_precision(precision, device), device):
        loss = variant.training_loss(inputs, labels)
    loss.backward()
    variant.loaded.model.zero_grad(set_to_none=True)  # gradients would only pile up: nothing steps on them
    return loss.detach()


def training_step_seconds(variant: BenchVariant, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                          precision: Precision = "auto") -> float:
    with trainable(variant.loaded):
        return timed(variant.loaded.device, lambda: training_step(variant, inputs, labels, precision))


def prefill_memory(variant: BenchVariant, inputs: Mapping[str, torch.Tensor]) -> tuple[int, str]:
    """Bytes a prefill needs and which measure they are: on CUDA the peak allocated above what was allocated
    before (weights, inputs), elsewhere the cache it leaves (CPU has no allocator statistics)."""
    device = variant.loaded.device
    with torch.no_grad():
        if device.type != "cuda":
            return variant.prefill(inputs).cache_bytes, KV_CACHE
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        variant.prefill(inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, CUDA_PEAK


def interleaved(variants: Sequence[BenchVariant], measure: Callable[[BenchVariant], float], repeats: int,
                step: Callable[[], None]) -> list[list[float]]:
    """`measure(variant)` per variant per repeat, the variants in turn within each repeat, after one untimed
    warm-up run of each (first calls pay for allocation and kernel selection)."""
    for variant in variants:
        measure(variant)
        step()
    values: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for row, variant in zip(values, variants):
            row.append(measure(variant))
            step()
    return values
