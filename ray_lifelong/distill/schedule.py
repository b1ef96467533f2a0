"""Inheritance-rate schedules alpha_t of Knowledge Inheritance (Qin et al., NAACL 2022, section 3)."""

from __future__ import annotations

import math

SCHEDULES = ("linear", "step", "constant", "cosine")


def inheritance_rate(step: int, *, schedule: str, steps: int, alpha0: float = 1.0) -> float:
    """alpha at optimizer ``step`` (0-based).

    - ``linear``: alpha0 * max(0, 1 - step / steps) (the paper's default);
    - ``step``: alpha0 until ``steps``, then 0 (teacher first, then self-learning);
    - ``constant``: alpha0 throughout;
    - ``cosine``: alpha0 * (1 + cos(pi * min(step, steps) / steps)) / 2.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    if schedule == "constant":
        return alpha0
    if steps <= 0:
        return 0.0
    if schedule == "linear":
        return alpha0 * max(0.0, 1.0 - step / steps)
    if schedule == "step":
        return alpha0 if step < steps else 0.0
    return alpha0 * (1.0 + math.cos(math.pi * min(step, steps) / steps)) / 2.0


def teacher_needed(step: int, *, schedule: str, steps: int, alpha0: float = 1.0) -> bool:
    """Whether the teacher still contributes at ``step`` or any later step (else it can be freed)."""
    if alpha0 == 0:
        return False
    return schedule == "constant" or step < steps
