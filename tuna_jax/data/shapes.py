"""Padded sizes, so a stream of inputs of every size compiles a handful of shapes.

A jitted function recompiles for every new input shape. Scoring, generation and the proxy ranking
model pad each batch to a *bucketed* length (:func:`bucket_length`); a training run plans every
batch's shape before its first step and gives the run at most ``data.shape_buckets`` shapes, the
ones that compute the fewest token positions over the run (:func:`bucket_sizes`,
:func:`bucket_shapes`, used by ``data.batching.BatchIterator``).
"""
from __future__ import annotations

import collections
from typing import Callable, Hashable, Mapping, Sequence, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")


def bucket_length(n: int, multiple: int = 64) -> int:
    """The padded length (tokens) for a longest row of ``n`` tokens: powers of two from 8 up to
    ``multiple``, then multiples of ``multiple`` (at most ``multiple - 1`` padding tokens per row)."""
    if n <= multiple:
        return max(8, 1 << (n - 1).bit_length())
    return -(-n // multiple) * multiple


def bucket_sizes(needs: Sequence[int], k: int) -> list[int]:
    """At most ``k`` sizes covering ``needs`` (each need rounded up to the smallest size >= it) with
    the least total: the optimal partition of the sorted distinct needs into at most k runs, each
    run's size its largest (dynamic programming, O(k n^2) over n distinct needs, vectorised over one
    index). The largest need is always a size, so ``k=1`` gives ``[max(needs)]``; of equally cheap
    choices, one with the fewest sizes is taken, and the result depends only on the multiset of needs."""
    tally = collections.Counter(int(n) for n in needs)
    values = sorted(tally)
    if len(values) <= k:
        return values
    v = np.asarray(values, np.int64)
    cum = np.concatenate([[0], np.cumsum([tally[x] for x in values])]).astype(np.int64)
    n = len(values)
    # best[j]: the least total of the needs up to values[j] in at most m runs, the last ending at j;
    # a run values[i..j] costs (needs in it) * values[j]. starts[m - 2][j]: where the last run starts
    # in that best choice for m runs (0: m - 1 runs do as well, the fewer is kept).
    best = cum[1:] * v
    starts = []
    for _ in range(2, k + 1):
        new, start = best.copy(), np.zeros(n, np.int64)
        for j in range(1, n):
            cost = best[:j] + (cum[j + 1] - cum[1:j + 1]) * v[j]  # the last run values[i..j], i = 1..j
            i = int(np.argmin(cost))
            if cost[i] < new[j]:
                new[j], start[j] = cost[i], i + 1
        starts.append(start)
        best = new
    sizes, j, m = [], n - 1, k
    while j >= 0:
        if m == 1:
            sizes.append(values[j])
            break
        i = int(starts[m - 2][j])
        if i:
            sizes.append(values[j])
            j = i - 1
        m -= 1
    return sorted(sizes)


def bucket_shapes(shapes: Mapping[K, S], k: int, size: Callable[[S], int]) -> dict[K, S]:
    """Each batch's planned shape replaced by its bucket's: at most ``k`` distinct shapes.

    ``shapes``: batch key -> the smallest shape that holds the batch (with ``union``); ``size``: a
    shape's cost (token positions). The batches are grouped by size into the runs
    :func:`bucket_sizes` picks, and every batch of a run takes the union of the run's shapes, so it
    still holds its batch. When one dimension of the shapes varies with the cost and the others
    follow it (every layout: padded and prefix_shared vary the length, packed the row count), the
    union's size is the run's largest, and the total size over the batches is the least any k
    shapes give."""
    sizes = bucket_sizes([size(s) for s in shapes.values()], k)
    runs: dict[int, S] = {}
    for s in shapes.values():
        b = min(x for x in sizes if x >= size(s))
        runs[b] = s if b not in runs else runs[b].union(s)
    return {key: runs[min(x for x in sizes if x >= size(s))] for key, s in shapes.items()}
