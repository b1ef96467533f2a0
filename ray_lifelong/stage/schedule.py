"""Learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math

LR_DECAYS = ("linear", "cosine", "constant")


def lr_multiplier(
    step: int, total: int, *, warmup: int, decay: str = "linear", min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak LR at optimizer ``step`` (0-based): linear warmup then decay to
    ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "linear":
        shape = 1.0 - progress
    elif decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown decay {decay!r}")
    return min_ratio + (1.0 - min_ratio) * shape
