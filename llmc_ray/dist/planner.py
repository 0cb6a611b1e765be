"""Assign contiguous block ranges to actors so the heaviest actor holds as few bytes as possible.

Embeddings count against the first actor and norm + head against the last, since that is where they live.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from ..config import ConfigError


def partition(block_bytes: Sequence[int], n: int, first_extra: int = 0, last_extra: int = 0) -> List[Tuple[int, ...]]:
    """Optimal contiguous split of blocks into n non-empty ranges minimising the largest range total.
    A small DP (n * L^2): L is at most a few hundred blocks."""
    L = len(block_bytes)
    if n > L:
        raise ConfigError(f"dist.actors={n} but the model has {L} blocks: use at most {L} actors")
    prefix = [0]
    for b in block_bytes:
        prefix.append(prefix[-1] + b)

    def cost(k: int, i: int, j: int) -> int:  # actor k takes blocks [i, j)
        c = prefix[j] - prefix[i]
        if k == 0:
            c += first_extra
        if k == n - 1:
            c += last_extra
        return c

    INF = float("inf")
    # best[k][j]: minimal max-load placing blocks [0, j) on actors 0..k
    best = [[INF] * (L + 1) for _ in range(n)]
    cut = [[0] * (L + 1) for _ in range(n)]
    for j in range(1, L + 1):
        best[0][j] = cost(0, 0, j)
    for k in range(1, n):
        for j in range(k + 1, L + 1):
            for i in range(k, j):
                v = max(best[k - 1][i], cost(k, i, j))
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    ranges, j = [], L
    for k in range(n - 1, 0, -1):
        i = cut[k][j]
        ranges.append(tuple(range(i, j)))
        j = i
    ranges.append(tuple(range(0, j)))
    return ranges[::-1]
