"""The three-mismatch ablation: streaming in arrival order with exactly the chosen mismatches fixed.

Decoding a batch-trained model in arrival order differs from batch mode in three ways: (1) input
attention: source tokens attend to target tokens written before them; (2) output attention: a target
token sees only the source read before it, not what was read later; (3) positions follow arrival order
instead of counting within the source and within the target. `ReplayStream` keeps the arrival order of every
token and gives each the mask row and position id the fixes ask for. A token's row looks only at tokens
before it, so its keys and values stay valid and are cached, except with output attention fixed: then
earlier target tokens also see source read after them, and a READ makes the cache stale from the first
target token on, encoded again at the next WRITE (as re-encoding does). With no fix it is
`streams.InterleavedStream`; with input attention and positions fixed it is `streams.GroupStream` (tests
hold both, and the cache against a replay from scratch); fixing output attention is what re-encoding buys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from efficient_models.streaming.groups import SourceGroup
from efficient_models.streaming.two_caches import ComputeCount, KVStore, forward_new_tokens


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
        self.cache = KVStore()  # keys and values of order[:len(cache)]
        self.units_read = 0
        self.compute = ComputeCount()

    def read_until(self, units: int) -> None:
        start, stop = self.source.tokens_of_units(self.units_read), self.source.tokens_of_units(units)
        self.order += [(token, False) for token in self.source.ids[start:stop]]
        if stop > start and self.fixes.output_attention:
            # Cached target tokens now see the new source, and so does all that attends to them.
            first_target = next((index for index, (_, kind) in enumerate(self.order) if kind), len(self.order))
            self.cache.crop(min(len(self.cache), first_target))
        self.units_read = max(self.units_read, units)

    def write(self, tokens: Sequence[int], first_index: int) -> torch.Tensor:
        self.order += [(token, True) for token in tokens]
        allowed, positions = arrival_mask_and_positions([kind for _, kind in self.order], self.fixes,
                                                        self.target_offset)
        cached = len(self.cache)
        logits, fresh = forward_new_tokens(self.model, [token for token, _ in self.order[cached:]],
                                           positions[cached:], [self.cache], allowed[cached:, :cached],
                                           among_new=allowed[cached:, cached:], count=self.compute)
        self.cache.append(fresh)
        return logits[-len(tokens):]

    def take_back_last(self) -> None:
        self.order.pop()
        self.cache.crop(min(len(self.cache), len(self.order)))


def ablation_layouts() -> dict[str, Callable[..., ReplayStream]]:
    """A decoding layout per single fix (and none), for `decoding.stream_translate`'s `layout`."""
    def layout(fixes: Fixes):
        return lambda model, source, target_offset=0: ReplayStream(model, source, target_offset, fixes)

    return {"fix-none": layout(Fixes()), "fix-input": layout(Fixes(input_attention=True)),
            "fix-output": layout(Fixes(output_attention=True)), "fix-positions": layout(Fixes(positions=True))}
