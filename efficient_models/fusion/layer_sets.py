"""Which vision-tower layers a fusion reads: named layer sets resolved to indices into `hidden_states`.

Indices follow Hugging Face's `hidden_states` of the vision tower: 0 is the patch embeddings, l (1..N) the
output of layer l, so a tower of N layers has indices 0..N. The base is the layer the model already reads
(its `vision_feature_layer`; -1 on the default model, i.e. N); it is always the last group.

A group is one index, or a list of indices (a whole stage) that is averaged before fusion. The names scale
the reference's CLIP-L choices (24 layers, base 23) by depth, so every tower gets the same shares:
- `single`: [round(3N/4), base]                       CLIP-L: [18, 23]
- `stages`: one per stage, [round(N/8), round(3N/4), base]   CLIP-L: [3, 18, 23]
- `former`: [[1..N/2], base]  the first half of the layers, averaged
- `latter`: [[N/2+1..N], base]  the second half, averaged
- `all`:    [[1..N], base]  every layer, averaged
An explicit list names the extra groups; the base is added last (an extra equal to the base is dropped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

from workbench.errors import InputError

LayerSetName = Literal["single", "stages", "former", "latter", "all"]
LAYER_SET_NAMES = get_args(LayerSetName)
Group = int | list[int]  # one hidden-states index, or a whole stage averaged first


def round_half_up(value: float) -> int:
    """Rounding that does not depend on Python's round-half-to-even (12 layers / 8 = 1.5 -> 2)."""
    return math.floor(value + 0.5)


def normalise_index(index: int, num_layers: int, what: str) -> int:
    """A hidden-states index in 0..N (negative ones count from the end, as Python and HF do)."""
    if not -(num_layers + 1) <= index <= num_layers:
        raise InputError(f"{what} {index} is outside 0..{num_layers} (hidden states of a {num_layers}-layer tower)")
    return index % (num_layers + 1)


def named_groups(name: str, num_layers: int) -> list[Group]:
    """The extra groups of a named layer set (the base not included)."""
    half = num_layers // 2
    named = {
        "single": [round_half_up(3 * num_layers / 4)],
        "stages": [round_half_up(num_layers / 8), round_half_up(3 * num_layers / 4)],
        "former": [list(range(1, half + 1))],
        "latter": [list(range(half + 1, num_layers + 1))],
        "all": [list(range(1, num_layers + 1))],
    }
    if name not in named:
        raise InputError(f"unknown layer set {name!r}; choose one of {', '.join(LAYER_SET_NAMES)} or list indices")
    return named[name]


def resolve_layer_set(layers: str | Sequence[Group], num_layers: int, base: int) -> list[Group]:
    """The groups a fusion reads, in order, the base last: see the module docstring for the names."""
    if num_layers < 2:
        raise InputError(f"a {num_layers}-layer vision tower has no layers to fuse")
    base = normalise_index(base, num_layers, "base layer")
    extras = named_groups(layers, num_layers) if isinstance(layers, str) else list(layers)
    groups: list[Group] = []
    for group in extras:
        if isinstance(group, int):
            resolved: Group = normalise_index(group, num_layers, "layer")
        else:
            resolved = sorted({normalise_index(index, num_layers, "layer") for index in group})
            if not resolved:
                raise InputError("an averaged layer group is empty")
            resolved = resolved[0] if len(resolved) == 1 else resolved
        if resolved != base and resolved not in groups:  # the base is always added once, last
            groups.append(resolved)
    if not groups:
        raise InputError(f"the layer set {layers!r} adds no layer to the base {base}")
    return [*groups, base]


def group_depth(group: Group) -> float:
    """Where a group sits in the tower: its index, or a stage's mean index."""
    return group if isinstance(group, int) else sum(group) / len(group)
