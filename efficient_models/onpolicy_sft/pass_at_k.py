"""pass@k with the unbiased estimator of Chen et al. (2021): from n samples of which c are correct,
pass@k = 1 - C(n - c, k) / C(n, k), the chance that k samples drawn without replacement hold a correct one."""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with `c` correct out of `n` samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    # Exact integers: the ratio of two large binomials in floats loses precision for n in the hundreds.
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """The mean pass@k over problems, each sampled `n` times with `correct_counts[i]` correct."""
    if not correct_counts:
        raise ValueError("pass@k needs at least one problem")
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)
