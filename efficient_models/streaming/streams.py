"""Where streamed tokens go, in three layouts that share the READ / WRITE interface the decoding loop drives.

`GroupStream` (the method): a source cache and a target cache; source tokens take positions 0, 1, ... as
they arrive and attend to the source only; target tokens take positions phi, phi + 1, ... and attend to the
read source and the target. `InterleavedStream` (baseline b): one cache in arrival order; every token takes
the next position and attends to everything before it, so a source word read after some target words
attends to them (the input-attention mismatch) and positions interleave. `ReencodingStream` (baseline a):
after each READ, the batch layout [prompt, source read so far, source end, prefix, target so far] is
encoded afresh with contiguous positions and a causal mask; between READs it decodes with its cache. The
part before the new source (prompt and earlier words) is unchanged under a causal mask, so it keeps its
cache, as prefix caching would; the source end, prefix and target move and are encoded again.

`ablation.py` adds the three-mismatch ablation's layouts. Each layout counts what it runs through the model
(`compute`: tokens and attended query-key pairs), the compute of a decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from efficient_models.streaming.ablation import ablation_layouts
from efficient_models.streaming.groups import SourceGroup
from efficient_models.streaming.two_caches import ComputeCount, KVStore, forward_new_tokens


class GroupStream:
    def __init__(self, model, source: SourceGroup, target_offset: int = 0) -> None:
        self.model, self.source, self.target_offset = model, source, target_offset
        self.source_cache, self.target_cache = KVStore(), KVStore()
        self.units_read = 0
        self.compute = ComputeCount()

    def read_until(self, units: int) -> None:
        """READ: encode source units up to `units` (exclusive) against the source cache only."""
        start, stop = self.source.tokens_of_units(self.units_read), self.source.tokens_of_units(units)
        if stop > start:
            sees = torch.ones(stop - start, start, dtype=torch.bool)
            _, fresh = forward_new_tokens(self.model, self.source.ids[start:stop], range(start, stop),
                                          [self.source_cache], sees, count=self.compute)
            self.source_cache.append(fresh)
        self.units_read = max(self.units_read, units)

    def write(self, tokens: Sequence[int], first_index: int) -> torch.Tensor:
        """WRITE: feed target tokens (target indices from `first_index`) against the read source and the target."""
        sees = torch.ones(len(tokens), len(self.source_cache) + len(self.target_cache), dtype=torch.bool)
        start = self.target_offset + first_index
        logits, fresh = forward_new_tokens(self.model, tokens, range(start, start + len(tokens)),
                                           [self.source_cache, self.target_cache], sees, count=self.compute)
        self.target_cache.append(fresh)
        return logits

    def take_back_last(self) -> None:
        """Drop the last target token from the cache (it is fed again after a READ)."""
        self.target_cache.crop(len(self.target_cache) - 1)


class InterleavedStream:
    def __init__(self, model, source: SourceGroup, target_offset: int = 0) -> None:
        self.model, self.source = model, source
        self.cache = KVStore()
        self.order: list[tuple[int, bool]] = []  # (token id, is target) in cache order; position = index
        self.units_read = 0
        self.compute = ComputeCount()

    def _feed(self, tokens: Sequence[int], target: bool) -> torch.Tensor:
        start = len(self.cache)
        logits, fresh = forward_new_tokens(self.model, tokens, range(start, start + len(tokens)), [self.cache],
                                           torch.ones(len(tokens), start, dtype=torch.bool), count=self.compute)
        self.cache.append(fresh)
        self.order += [(token, target) for token in tokens]
        return logits

    def read_until(self, units: int) -> None:
        start, stop = self.source.tokens_of_units(self.units_read), self.source.tokens_of_units(units)
        if stop > start:
            self._feed(self.source.ids[start:stop], target=False)
        self.units_read = max(self.units_read, units)

    def write(self, tokens: Sequence[int], first_index: int) -> torch.Tensor:
        return self._feed(list(tokens), target=True)

    def take_back_last(self) -> None:
        self.cache.crop(len(self.cache) - 1)
        self.order.pop()


class ReencodingStream:
    def __init__(self, model, source: SourceGroup, target_offset: int = 0) -> None:
        self.model, self.source = model, source
        self.cache = KVStore()
        self.encoded: list[int] = []  # the tokens in the cache, in order
        self.target: list[int] = []  # the target tokens fed so far
        self.units_read = 0
        self.compute = ComputeCount()

    def _batch_source(self) -> list[int]:
        """The prompt and the words read so far, closed by the source end as a full sentence would be."""
        last = self.source.num_units - 1
        return [token for token, unit in zip(self.source.ids, self.source.units, strict=True)
                if unit < min(self.units_read, last) or unit == last]

    def read_until(self, units: int) -> None:
        self.units_read = max(self.units_read, units)

    def write(self, tokens: Sequence[int], first_index: int) -> torch.Tensor:
        self.target = [*self.target[:first_index], *tokens]
        sequence = [*self._batch_source(), *self.target]
        kept = next((index for index, (old, new) in enumerate(zip(self.encoded, sequence)) if old != new),
                    min(len(self.encoded), len(sequence)))
        kept = min(kept, len(sequence) - len(tokens))  # the new tokens' logits are always computed
        self.cache.crop(kept)
        fed = sequence[kept:]
        logits, fresh = forward_new_tokens(self.model, fed, range(kept, len(sequence)), [self.cache],
                                           torch.ones(len(fed), kept, dtype=torch.bool), count=self.compute)
        self.cache.append(fresh)
        self.encoded = sequence
        return logits[-len(tokens):]

    def take_back_last(self) -> None:
        self.target.pop()


LAYOUTS = {"group": GroupStream, "interleaved": InterleavedStream, "reencode": ReencodingStream,
           **ablation_layouts()}
