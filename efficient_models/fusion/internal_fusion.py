"""I_D, internal direct fusion: each extra vision layer (or averaged stage) has its own projector, whose
output is added to the LLM's hidden states at the image positions before the decoder layer at the same
relative depth (extra layer l of N -> LLM layer round(l / N * num_llm_layers), clamped).

It is done with hooks rather than a rewritten forward so that the model stays the Hugging Face class and
runs the same under `generate`, the token-schedule engine and the bench:
- a pre-hook on the input embeddings records where the image tokens of this call are (decode steps have
  none, so the addition happens at prefill only);
- forward hooks on the vision layers keep the extra layers' outputs of this call's images;
- a pre-hook on each target decoder layer adds the projected features at those positions.

Training from a feature cache (`wb train fusion`, mode internal) runs no vision tower: there the caller puts
the cached layer outputs of each step's images into the hooks' `CallState`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efficient_models.fusion.layer_sets import Group, group_depth, round_half_up
from workbench.errors import InputError
from workbench.files import write_atomically
from workbench.models.adapter import ArchitectureAdapter

INTERNAL_FUSION_FILE = "internal_fusion.safetensors"


def target_llm_layer(depth: float, num_vision_layers: int, num_llm_layers: int) -> int:
    """The decoder layer at the same relative depth as vision layer `depth`, clamped to the LLM."""
    return min(max(round_half_up(depth / num_vision_layers * num_llm_layers), 0), num_llm_layers - 1)


def zero_output_copy(projector: nn.Module) -> nn.Module:
    """A copy of the trained projector whose last linear outputs zero: it adds nothing until it is trained."""
    fresh = copy.deepcopy(projector)
    last = [module for module in fresh.modules() if isinstance(module, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    return fresh


class InternalFusion(nn.Module):
    """The extra groups' projectors and the decoder layer each one adds to."""

    def __init__(self, groups: list[Group], targets: list[int], projectors: list[nn.Module]):
        super().__init__()
        self.groups, self.targets = groups, targets
        self.projectors = nn.ModuleList(projectors)

    @property
    def vision_layers(self) -> list[int]:
        """The tower's `hidden_states` indices the groups read."""
        return sorted({index for group in self.groups for index in ([group] if isinstance(group, int) else group)})

    @classmethod
    def for_model(cls, adapter: ArchitectureAdapter, groups: list[Group]) -> InternalFusion:
        """Projectors for every group but the base (the last, which the model's own projector reads)."""
        extras = groups[:-1]
        for group in extras:
            if 0 in ([group] if isinstance(group, int) else group):
                raise InputError("internal fusion reads layer outputs (1..N); index 0, the embeddings, is not one")
        targets = [target_llm_layer(group_depth(group), adapter.num_vision_layers, adapter.num_llm_layers)
                   for group in extras]
        return cls(extras, targets, [zero_output_copy(adapter.projector) for _ in extras])


@dataclass
class CallState:
    """What the hooks share within one forward call."""

    image_mask: torch.Tensor | None = None  # [batch, seq] image-token positions of this call's input ids
    layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # hidden-states index -> [images, tokens, d]


def first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def attach(adapter: ArchitectureAdapter, fusion: InternalFusion,
           cached: CallState | None = None) -> list[torch.utils.hooks.RemovableHandle]:
    """Install the hooks (see the module docstring); remove the returned handles to detach.

    `cached`: the caller fills its `layer_outputs` before each call (from a feature cache), and the vision
    tower is not hooked."""
    state = cached or CallState()
    drop_cls = adapter.model.config.vision_feature_select_strategy == "default"

    def record_positions(module, args):
        state.image_mask = args[0] == adapter.image_token_id
        if cached is None:
            state.layer_outputs.clear()  # features of an earlier call must never be added to this one

    def keep_output(index):
        def hook(module, args, output):
            state.layer_outputs[index] = first_tensor(output)
        return hook

    def add_at_image_positions(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = state.image_mask
            # Prefill only: this call's input holds the image tokens (a decode step's one token does not).
            if mask is None or not bool(mask.any()) or mask.shape != hidden.shape[:2]:
                return None
            for group, target, projector in zip(fusion.groups, fusion.targets, fusion.projectors):
                if target == layer:
                    hidden = hidden + scattered(group, projector, mask, hidden)
            return ((hidden, *args[1:]), kwargs) if args else (args, kwargs | {"hidden_states": hidden})
        return hook

    def scattered(group, projector, mask, hidden):
        indices = [group] if isinstance(group, int) else group
        features = torch.stack([state.layer_outputs[index] for index in indices]).mean(0)
        features = features[:, 1:] if drop_cls else features
        # Under autocast the projector computes in bf16 while the residual stream stays in float32.
        projected = projector(features.to(hidden.dtype)).to(hidden.dtype).reshape(-1, hidden.shape[-1])
        if projected.shape[0] != int(mask.sum()):
            raise ValueError(f"{int(mask.sum())} image tokens but {projected.shape[0]} fused features")
        return torch.zeros_like(hidden).masked_scatter(mask[..., None], projected)

    handles = [adapter.embed_tokens.register_forward_pre_hook(record_positions)]
    if cached is None:  # hidden_states[l] is the output of vision layer l - 1
        handles += [adapter.vision_layers[index - 1].register_forward_hook(keep_output(index))
                    for index in fusion.vision_layers]
    handles += [adapter.llm_layers[layer].register_forward_pre_hook(add_at_image_positions(layer), with_kwargs=True)
                for layer in sorted(set(fusion.targets))]
    return handles


@contextmanager
def internal_fusion(adapter: ArchitectureAdapter, fusion: InternalFusion) -> Iterator[InternalFusion]:
    """The model runs with `fusion` inside the block, and as before after it."""
    handles = attach(adapter, fusion)
    try:
        yield fusion
    finally:
        for handle in handles:
            handle.remove()


def save_internal_fusion(fusion: InternalFusion, run_dir: Path) -> None:
    """The trained projectors, as `internal_fusion.safetensors` in a run folder."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in fusion.state_dict().items()}
    write_atomically(Path(run_dir) / INTERNAL_FUSION_FILE, lambda target: save_file(tensors, str(target)))


def load_internal_fusion(fusion: InternalFusion, run_dir: Path) -> None:
    """Load a run's trained projectors into `fusion` (built for the same groups)."""
    path = Path(run_dir) / INTERNAL_FUSION_FILE
    if not path.is_file():
        raise InputError(f"{run_dir} is an internal-fusion run without {INTERNAL_FUSION_FILE}")
    weights = load_file(path)
    if set(weights) != set(fusion.state_dict()):
        raise InputError(f"{path} holds projectors for other layers than the run's config names")
    fusion.load_state_dict(weights)  # copies into the projectors where they are, on any device
