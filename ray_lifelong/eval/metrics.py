"""ELLE's lifelong-learning metrics on a perplexity matrix (pure; no torch, no Ray).

``ppl[i][j]`` is the perplexity on domain j's validation set of the model at the end of stage i
(stage i trains on domain i). Domains j <= i are "seen" after stage i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check(ppl: Matrix) -> int:
    n = len(ppl)
    for i, row in enumerate(ppl):
        if len(row) < n:
            raise ValueError(f"row {i} has {len(row)} entries; need at least {n} (one per stage's domain)")
    return n


def average_perplexity(ppl: Matrix, geometric: bool = True) -> list[float]:
    """AP_i over the domains seen after stage i: geometric mean exp(mean ln PPL) or arithmetic mean."""
    n = _check(ppl)
    out = []
    for i in range(n):
        seen = [ppl[i][j] for j in range(i + 1)]
        out.append(math.exp(sum(math.log(p) for p in seen) / len(seen)) if geometric
                   else sum(seen) / len(seen))
    return out


def average_increased_perplexity(ppl: Matrix) -> list[float | None]:
    """AP+_i = mean over j < i of (PPL[i][j] - PPL[j][j]): forgetting; ``None`` for the first stage."""
    n = _check(ppl)
    out: list[float | None] = [None]
    for i in range(1, n):
        out.append(sum(ppl[i][j] - ppl[j][j] for j in range(i)) / i)
    return out


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean natural-log cross-entropy); inf when nothing was scored."""
    return math.exp(nll_sum / count) if count else math.inf
