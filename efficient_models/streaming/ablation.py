"""The three-mismatch ablation: streaming in arrival order with exactly the chosen mismatches fixed.

Decoding a batch-trained model in arrival order differs from batch mode in three ways: (1) input
attention: source tokens attend to target tokens written before them; (2) output attention: a target
token sees only the source read before it, not what was read later; (3) positions follow arrival order
instead of counting within the source and within the target. `ReplayStream` keeps the arrival order of
every token and, at each WRITE, runs one forward over all of it (no cache, so earlier tokens can be
recomputed against later ones) with the mask and position ids the fixes ask for. With no fix it is
`streams.InterleavedStream`; with input attention and positions fixed it is `streams.GroupStream` (tests
hold both); fixing output attention is what re-encoding buys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from efficient_models.streaming.groups import SourceGroup
from efficient_models.streaming.two_caches import forward_new_tokens

@dataclass(frozen=True)
class Fixes:
    input_attention: bool = False  # source tokens never attend to target tokens
    output_attention: bool = False  # target tokens attend to all the source read so far
    positions: bool = False  # group positions: source 0.., target phi.. (else arrival order)


def arrival_mask_and_positions(is_target: Sequence[bool], fixes: Fixes, target_offset: int = 0
                               ) -> tuple[torch.Tensor, list[int]]:
    """The boolean [n, n] mask and the position ids of tokens in arrival order, with `fixes` applied."""
    target = torch.tensor(is_target, dtype=torch.bool)
    length = len(is_target)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    if fixes.input_attention:
        allowed[~target] &= ~target[None, :]
    if fixes.output_attention:
        allowed[target] |= ~target[None, :]
    if not fixes.positions:
        return allowed, list(range(length))
    counts = {False: 0, True: 0}
    positions = []
    for kind in is_target:
        positions.append(counts[kind] + (target_offset if kind else 0))
        counts[kind] += 1
    return allowed, positions


class ReplayStream:
    def __init__(self, model, source: SourceGroup, target_offset: int = 0, fixes: Fixes = Fixes()) -> None:
        self.model, self.source, self.target_offset, self.fixes = model, source, target_offset, fixes
        self.order: list[tuple[int, bool]] = []  # (token id, is target), in arrival order
        self.units_read = 0
        self.forward_tokens = 0

    def read_until(self, units: int) -> None:
        start, stop = self.source.tokens_of_units(self.units_read), self.source.tokens_of_units(units)
        self.order += [(token, False) for token in self.source.ids[start:stop]]
        self.units_read = max(self.units_read, units)

    def write(self, tokens: Sequence[int], first_index: int) -> torch.Tensor:
        self.order += [(token, True) for token in tokens]
        allowed, positions = arrival_mask_and_positions([kind for _, kind in self.order], self.fixes,
                                                        self.target_offset)
        ids = [token for token, _ in self.order]
        logits, _ = forward_new_tokens(self.model, ids, positions, [], torch.ones(len(ids), 0, dtype=torch.bool),
                                       among_new=allowed)
        self.forward_tokens += len(ids)
        return logits[-len(tokens):]

    def take_back_last(self) -> None:
        self.order.pop()


def ablation_layouts() -> dict[str, Callable[..., ReplayStream]]:
    """A decoding layout per single fix (and none), for `decoding.stream_translate`'s `layout`."""
    def layout(fixes: Fixes):
        return lambda model, source, target_offset=0: ReplayStream(model, source, target_offset, fixes)

    return {"fix-none": layout(Fixes()), "fix-input": layout(Fixes(input_attention=True)),
            "fix-output": layout(Fixes(output_attention=True)), "fix-positions": layout(Fixes(positions=True))}
