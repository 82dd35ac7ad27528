"""SkipGPT's routers: per decoder layer one for attention and one for the MLP, and the hard gates they give.

A router is Linear(d -> d/4) -> ReLU -> Linear(d/4 -> 2) over a token's hidden state; class 0 is "run",
class 1 "skip". Both routers of a layer read the layer's input before its norm: the MLP router reads the
pre-attention state too (as the reference does), so a layer decides both of its modules up front, which is
what lets real skipping gather the MLP's tokens before attention has run.

Two choices of ours: the router scales its input to unit RMS first (no parameters, not the layer's norm
with its learnt gains), because the residual stream's scale grows ~200x over SmolLM2's depth and its
attention-sink token reaches ~2e4, which on raw states gives extreme logits from the start and unstable
steps at lr 2e-3; and its last layer starts with zero weights and a bias towards running, so training
starts from the dense model (argmax runs everything) and the sparsity loss pulls modules off from there.

Training draws hard straight-through Gumbel-softmax gates: the forward value is exactly 0 or 1, the gradient
is the soft sample's. The temperature falls linearly from 5 to 1 over training; it shapes the gradient only,
since the hard sample argmax(logits + noise) does not depend on it. Evaluation takes the argmax, with no noise.

Ours again: the Gumbel noise is scaled by a factor that falls linearly from 1 to 0 over the router stage (the
config's `noise_start`, `noise_end`; 1 to 1 is the reference). Under full noise the sparsity loss is met by
giving every token P(run) = 1 - s, and an argmax of such routers runs everything; with the noise gone by
the end, the routing that meets the budget is the argmax that evaluation uses.
"""

from __future__ import annotations

import torch
from torch import nn

RUN, SKIP = 0, 1  # router classes
# The last layer's starting bias: P(run) = sigmoid(2) = 0.88 under Gumbel noise, every token runs under argmax.
INITIAL_RUN_BIAS = 1.0


class Router(nn.Module):
    """Two logits (run, skip) per token from its hidden state."""

    def __init__(self, hidden_size: int, reduction: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size // reduction), nn.ReLU(),
                                 nn.Linear(hidden_size // reduction, 2))
        with torch.no_grad():
            self.net[2].weight.zero_()
            self.net[2].bias.copy_(torch.tensor([INITIAL_RUN_BIAS, -INITIAL_RUN_BIAS]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(nn.functional.rms_norm(hidden, hidden.shape[-1:]))


class LayerRouters(nn.Module):
    """The attention and MLP routers of one decoder layer."""

    def __init__(self, hidden_size: int, reduction: int = 4) -> None:
        super().__init__()
        self.attention = Router(hidden_size, reduction)
        self.mlp = Router(hidden_size, reduction)


def run_gate(logits: torch.Tensor, temperature: float | torch.Tensor | None,
             noise: float | torch.Tensor = 1.0) -> torch.Tensor:
    """1.0 where a token runs the module, 0.0 where it skips: (..., 2) logits -> (...) gates.

    `temperature` None: deterministic argmax (evaluation). A number: a hard straight-through Gumbel-softmax
    sample at that temperature (training), its Gumbel noise scaled by `noise`; the value is exactly 0 or 1
    (argmax of logits + noise), the gradient that of the soft sample softmax((logits + noise) / temperature).
    """
    if temperature is None:
        return (logits[..., RUN] >= logits[..., SKIP]).to(logits.dtype)
    uniform = torch.rand_like(logits, dtype=torch.float32).clamp(min=1e-10, max=1 - 1e-7)
    noisy = logits.float() - float(noise) * torch.log(-torch.log(uniform))
    soft = torch.softmax(noisy / float(temperature), dim=-1)[..., RUN]
    hard = (noisy[..., RUN] >= noisy[..., SKIP]).float()
    return (hard - soft.detach() + soft).to(logits.dtype)


def linear_at(step: int, steps: int, start: float, end: float) -> float:
    """A value moving linearly from `start` (first step) to `end` (last step of `steps`)."""
    return start + (end - start) * step / max(1, steps - 1)
