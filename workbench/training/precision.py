"""The precision a training run computes in: `auto` (every recipe's default), `bf16` or `fp32`.

`auto` is bf16 autocast where the device computes bf16 natively and fp32 elsewhere, because bf16 on a
device without it is emulated and slow: on an AVX2-only CPU a default-recipe step took 130-150 s in bf16
against 3.3 s in fp32, while on a CPU with AVX512-BF16 bf16 is 1.25-1.4x faster than fp32. A recipe
may still force `bf16` or `fp32`. Weights and optimizer state stay float32 either way.
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]
ResolvedPrecision = Literal["bf16", "fp32"]


def computes_bf16_natively(device: torch.device) -> bool:
    """CUDA with native bf16 (no emulation), or a CPU with AVX512-BF16 or AMX instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # Asked instruction by instruction: `torch.backends.cpu.get_cpu_capability()` says only "AVX512" on a
        # CPU that has AVX512-BF16. The probes are private, so a torch without them falls back to fp32.
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(probe is not None and probe() for probe in probes)
    return False


def resolve_precision(requested: Precision, device: torch.device) -> ResolvedPrecision:
    """What `requested` means on `device`; called once per run, and the run records both values."""
    if requested != "auto":
        return requested
    return "bf16" if computes_bf16_natively(device) else "fp32"


def autocast(precision: ResolvedPrecision, device: torch.device) -> torch.autocast:
    """The forward pass's context: bf16 autocast, or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
