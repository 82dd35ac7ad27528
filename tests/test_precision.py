"""`auto` precision: bf16 where the device computes it natively, fp32 elsewhere; forced values stay."""

from __future__ import annotations

import pytest
import torch

from workbench.training import precision
from workbench.training.precision import resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def cpu_with(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize("avx512_bf16, amx, resolved", [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_auto_on_cpu_follows_the_bf16_instructions(monkeypatch, avx512_bf16, amx, resolved):
    cpu_with(monkeypatch, avx512_bf16, amx)
    assert resolve_precision("auto", CPU) == resolved


def test_auto_on_cpu_is_fp32_with_a_torch_that_cannot_say(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert resolve_precision("auto", CPU) == "fp32"


@pytest.mark.parametrize("native, resolved", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_native_bf16_support(monkeypatch, native, resolved):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native)
    assert resolve_precision("auto", CUDA) == resolved
    assert asked == [False]  # emulated bf16 is what `auto` avoids


@pytest.mark.parametrize("forced", ["bf16", "fp32"])
@pytest.mark.parametrize("native", [True, False])
def test_a_forced_precision_stays(monkeypatch, forced, native):
    cpu_with(monkeypatch, native, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    assert resolve_precision(forced, CPU) == resolve_precision(forced, CUDA) == forced


def test_other_devices_compute_in_fp32():
    assert not precision.computes_bf16_natively(torch.device("meta"))
    assert resolve_precision("auto", torch.device("meta")) == "fp32"
