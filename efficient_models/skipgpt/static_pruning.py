"""SkipGPT's static baseline: ShortGPT-style module pruning, the same modules removed for every token.

A module is one sublayer of a decoder layer, its attention or its MLP. Its *block influence* is
1 - the mean cosine similarity between the hidden state before and after its residual update, over the
tokens of calibration blocks (ShortGPT's measure, taken per sublayer). Pruning removes the share
`fraction` of modules with the lowest influence: the module is swapped for a stub that does not run it,
so the layer adds zero for it. The pre-norm in front of a removed module still runs (O(d) per token
against the module's O(d^2)); the model's own modeling file is not forked, so any Hugging Face
Llama-family decoder (`model.model.layers[i].self_attn` / `.mlp`) can be pruned.

KV cache: a removed attention writes no keys or values, but the cache reads positions and mask sizes
from a layer's length, so the stub appends a one-number placeholder per token to its layer; cached
generation then equals uncached generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel

from workbench.errors import InputError

Kind = Literal["attention", "mlp"]


class ModuleRef(NamedTuple):
    """One prunable module: a decoder layer (0-indexed) and its sublayer."""

    layer: int
    kind: Kind


@dataclass
class ModuleInfluence:
    """Block influence per decoder layer of its attention and its MLP sublayer (higher: changes more)."""

    attention: list[float]
    mlp: list[float]

    def ranked(self) -> list[ModuleRef]:
        """Every module from the lowest influence to the highest (ties: earlier layer, attention first)."""
        scores = [(value, ModuleRef(layer, "attention")) for layer, value in enumerate(self.attention)]
        scores += [(value, ModuleRef(layer, "mlp")) for layer, value in enumerate(self.mlp)]
        return [module for _, module in sorted(scores, key=lambda item: (item[0], item[1].layer, item[1].kind))]


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of a Llama-family causal LM."""
    return model.get_decoder().layers


@torch.no_grad()
def module_influence(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int = 8) -> ModuleInfluence:
    """Block influence of every module over all tokens of `blocks` (blocks, tokens), which hold no padding."""
    if blocks.dim() != 2 or len(blocks) == 0:
        raise InputError(f"calibration blocks must be a non-empty (blocks, tokens) tensor, not {tuple(blocks.shape)}")
    layers = decoder_layers(model)
    # Per layer: the summed cosine similarity over tokens across its attention, then across its MLP.
    sums = torch.zeros(len(layers), 2, dtype=torch.float64)
    handles = [handle for index, layer in enumerate(layers) for handle in _similarity_hooks(layer, sums[index])]
    try:
        for start in range(0, len(blocks), batch_size):
            model(input_ids=blocks[start:start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    influence = 1 - sums / blocks.numel()
    return ModuleInfluence(influence[:, 0].tolist(), influence[:, 1].tolist())


def _similarity_hooks(layer: nn.Module, sums: torch.Tensor) -> list:
    """Hooks that add to `sums` (2,) the cosine similarities across `layer`'s attention and MLP updates."""
    residual: dict[str, torch.Tensor] = {}

    def keep_input(module, args, kwargs):
        residual["stream"] = args[0] if args else kwargs["hidden_states"]

    # The hooks see each module's update alone; the residual stream is rebuilt from the layer's input.
    def after_attention(module, args, output):
        before, residual["stream"] = residual["stream"], residual["stream"] + output[0]
        sums[0] += _summed_cosine(before, residual["stream"])

    def after_mlp(module, args, output):
        sums[1] += _summed_cosine(residual["stream"], residual["stream"] + output)

    return [layer.register_forward_pre_hook(keep_input, with_kwargs=True),
            layer.self_attn.register_forward_hook(after_attention), layer.mlp.register_forward_hook(after_mlp)]


def _summed_cosine(before: torch.Tensor, after: torch.Tensor) -> float:
    """Sum over tokens of the cosine similarity of two (batch, tokens, d) hidden states."""
    return float(torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1).sum())


def lowest_influence(influence: ModuleInfluence, fraction: float) -> list[ModuleRef]:
    """The round(fraction x modules) modules of lowest influence; `fraction` in [0, 1)."""
    if not 0 <= fraction < 1:
        raise InputError(f"the pruned fraction must be in [0, 1), not {fraction}")
    ranked = influence.ranked()
    return ranked[:round(fraction * len(ranked))]


class _RemovedAttention(nn.Module):
    """Stands in for a removed attention: adds nothing, keeps its cache layer as long as the others."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, **kwargs):
        if past_key_values is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            past_key_values.update(placeholder, placeholder, self.layer_idx)
        # A zero-dimensional zero broadcasts over the residual: nothing of the hidden size is allocated.
        return hidden_states.new_zeros(()), None


class _RemovedMLP(nn.Module):
    """Stands in for a removed MLP: adds nothing."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros(())


@contextlib.contextmanager
def removed_modules(model: PreTrainedModel, modules: Sequence[ModuleRef]) -> Iterator[list[ModuleRef]]:
    """Run `model` with `modules` removed inside the block; the originals are put back when it ends."""
    layers = decoder_layers(model)
    for module in modules:
        if not 0 <= module.layer < len(layers) or module.kind not in ("attention", "mlp"):
            raise InputError(f"{module} names no module of a {len(layers)}-layer model")
    originals = [(layers[m.layer], "self_attn" if m.kind == "attention" else "mlp") for m in modules]
    kept = [getattr(layer, name) for layer, name in originals]
    try:
        for (layer, name), module in zip(originals, modules):
            setattr(layer, name, _RemovedAttention(module.layer) if name == "self_attn" else _RemovedMLP())
        yield list(modules)
    finally:
        for (layer, name), original in zip(originals, kept):
            setattr(layer, name, original)


@contextlib.contextmanager
def prune_modules(model: PreTrainedModel, influence: ModuleInfluence, fraction: float) -> Iterator[list[ModuleRef]]:
    """Remove the `fraction` of modules with the lowest `influence` inside the block; yields the removed list."""
    with removed_modules(model, lowest_influence(influence, fraction)) as removed:
        yield removed
