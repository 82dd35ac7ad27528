"""Which layers ViCA's text cross-attends to the image at: the measured choice, and the sets it is benched against.

The measurement is `wb analyze vica-layers` (`analyses.vica_layers`): text->visual attention is cut at one
layer at a time and the answer loss rises by `loss_increase` (its `layers` table, one row per layer, also
holds the other direct measures `accuracy_drop`, `logprob_drop`, `loss_change` and the cheaper proxies
`attention_mass`, `vision_effect` and `vision_effect_step`). Here:

- `choose_layers`: the k layers whose cut loses the most;
- `layers_from_run`: that choice read from a vica-layers run (or, from a similarity run, the largest steps of
  the image's effect on the text: the proxy ViCA's export used before the direct measure existed);
- `proxy_agreement`: how well each other column of that table ranks the layers as the direct measure does;
- the comparison sets: `evenly_spaced`, `first_layers`, `scaled_reference` (the reference's 7B pattern).

Layers are 0-indexed decoder layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from workbench.errors import InputError

DIRECT = "loss_increase"  # the measure layers are chosen by
PROXIES = ("accuracy_drop", "logprob_drop", "loss_change", "attention_mass", "vision_effect", "vision_effect_step")
REFERENCE_7B = (0, 1, 7, 8, 9, 10, 11, 14)  # the reference's layers for its 32-layer 7B model
REFERENCE_DEPTH = 32
COMPARISON_KS = (4, 8, 12)


def _check_count(num_layers: int, k: int) -> None:
    if not 1 <= k <= num_layers:
        raise InputError(f"cannot pick {k} of {num_layers} layers: k must be between 1 and {num_layers}")


def _round_half_up(value: float) -> int:
    # Python's round() sends 7.5 to 8 but 6.5 to 6; a layer pattern should not depend on parity.
    return math.floor(value + 0.5)


def evenly_spaced(num_layers: int, k: int) -> list[int]:
    """k layers spread from the first to the last (k = 1: the first), rounded half up."""
    _check_count(num_layers, k)
    if k == 1:
        return [0]
    return [_round_half_up(index * (num_layers - 1) / (k - 1)) for index in range(k)]


def first_layers(num_layers: int, k: int) -> list[int]:
    _check_count(num_layers, k)
    return list(range(k))


def scaled_reference(num_layers: int, pattern: Sequence[int] = REFERENCE_7B,
                     depth: int = REFERENCE_DEPTH) -> list[int]:
    """`pattern` (layers of a `depth`-layer model) at the same relative depths of a `num_layers`-layer model.

    Each layer i goes to round_half_up(i * num_layers / depth); a layer that lands on or below the one before
    it moves up to the next free layer, so the set keeps its size and its contiguous runs. On 30 layers the
    7B pattern {0, 1, 7, 8, 9, 10, 11, 14} becomes {0, 1, 7, 8, 9, 10, 11, 13} (8, 9 and 10 land on 8, 8
    and 9 and move up by one each).
    """
    _check_count(num_layers, len(pattern))
    layers: list[int] = []
    for layer in sorted(pattern):
        layers.append(max(_round_half_up(layer * num_layers / depth), layers[-1] + 1 if layers else 0))
    if layers[-1] >= num_layers:
        raise InputError(f"the {len(pattern)}-layer pattern {list(pattern)} does not fit {num_layers} layers")
    return layers


def comparison_sets(num_layers: int, ks: Iterable[int] = COMPARISON_KS,
                    per_layer_loss: Mapping[int, float] | Sequence[float] | None = None) -> dict[str, list[int]]:
    """The layer sets the bench compares, by name: for each k evenly spaced, the first k and (given the
    per-layer loss of a vica-layers run) the chosen k; and the scaled reference pattern where it fits."""
    sets = {}
    for k in ks:
        if per_layer_loss is not None:
            sets[f"chosen-{k}"] = choose_layers(per_layer_loss, k)
        sets[f"even-{k}"] = evenly_spaced(num_layers, k)
        sets[f"first-{k}"] = first_layers(num_layers, k)
    if num_layers >= len(REFERENCE_7B):
        sets["reference-7b-scaled"] = scaled_reference(num_layers)
    return sets


def _by_layer(values: Mapping[int, float] | Sequence[float]) -> dict[int, float]:
    return {int(layer): float(value) for layer, value in
            (values.items() if isinstance(values, Mapping) else enumerate(values))}


def choose_layers(per_layer_loss: Mapping[int, float] | Sequence[float], k: int) -> list[int]:
    """The k layers whose cut loses the most (a sequence is indexed by layer; ties go to the earlier layer),
    sorted, as `ViCAConfig.cross_attention_layers` wants them."""
    loss = _by_layer(per_layer_loss)
    if any(math.isnan(value) for value in loss.values()):
        raise InputError("the per-layer loss has missing (NaN) layers; finish the vica-layers run first")
    _check_count(len(loss), k)
    ranked = sorted(loss, key=lambda layer: (-loss[layer], layer))
    return sorted(ranked[:k])


def layers_from_run(store, k: int, measure: str = DIRECT) -> list[int]:
    """The k cross-attention layers a finished run recommends: from a vica-layers run the k layers whose
    text->visual cut raises the answer loss most (or ranks highest by another column, `measure`); from a
    similarity run the k largest steps of the image's effect on the text (`vision_effect`, a proxy)."""
    kind = store.manifest["kind"]
    table = store.read_table("layers").sort_values("layer")
    if kind == "vica-layers":
        if measure not in table:
            raise InputError(f"the vica-layers run {store.folder} has no measure {measure!r}")
        return choose_layers(dict(zip(table["layer"], table[measure])), k)
    if kind == "similarity":
        steps = table["vision_effect"].diff().fillna(table["vision_effect"])
        return choose_layers(dict(zip(table["layer"], steps)), k)
    raise InputError(f"ViCA's layers come from a vica-layers or similarity run; {store.folder} is a {kind!r} run")


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rank correlation (ties share their average rank); NaN when either side is constant."""
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if first.shape != second.shape or first.ndim != 1 or len(first) < 2:
        raise InputError(f"rank correlation needs two equally long lists of 2 or more values "
                         f"(got {len(first)} and {len(second)})")
    if np.ptp(first) == 0 or np.ptp(second) == 0:
        return float("nan")  # scipy would say the same, with a warning
    return float(spearmanr(first, second).statistic)


def proxy_agreement(layers: pd.DataFrame, direct: str = DIRECT, proxies: Sequence[str] = PROXIES,
                    ks: Iterable[int] = COMPARISON_KS) -> pd.DataFrame:
    """One row per other column of a vica-layers `layers` table: its Spearman correlation with `direct`
    over the layers, and for each k the share of the k layers it would choose that `direct` chooses too."""
    missing = [column for column in (direct, *proxies) if column not in layers]
    if missing:
        raise InputError(f"the layers table has no column {', '.join(missing)}")
    ks = [k for k in ks if k <= len(layers)]
    chosen = {k: set(choose_layers(dict(zip(layers["layer"], layers[direct])), k)) for k in ks}
    rows = []
    for proxy in proxies:
        by_proxy = dict(zip(layers["layer"], layers[proxy]))
        rows.append({"proxy": proxy, "spearman": spearman(layers[direct], layers[proxy])}
                    | {f"top{k}_overlap": len(chosen[k] & set(choose_layers(by_proxy, k))) / k for k in ks})
    return pd.DataFrame(rows)
