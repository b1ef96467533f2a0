"""Compute saved to reach a loss: the one rule behind every saving this project reports
(docs/design.md, "Compute").

A curve is a list of evaluations in training order, each a dict with ``valid_loss`` and the cumulative cost
``step`` and ``flops`` at that evaluation (a teacher's forward FLOPs included where it ran). Pure: no Ray, no
torch, so the benchmarks, the KI report and the unit tests share it.

The rule, ``cost_to_reach(curve, L*)``:

1. The evaluations are read in order; the **first** one whose validation loss is <= L* decides. A curve
   that later rises above L* again (validation losses are noisy) keeps that first crossing.
2. If that evaluation has an earlier one (which was above L*), the cost is interpolated linearly between the
   two, in the unit asked for (steps or FLOPs).
3. If it is the curve's **first point**, its own cost is the answer: nothing was evaluated before it, so no
   earlier crossing is credited. A curve that starts with an evaluation before training (step 0, cost 0, or
   the
   cost already spent, e.g. a grown model's small phase) therefore costs that start; a curve whose first
   evaluation comes after some training (``ray-lifelong ki``'s, from step ``eval_every`` on) costs that
   evaluation's step and FLOPs, never an interpolation towards an origin that was not evaluated.
4. A curve that never gets to L*, and an empty curve, cost ``None`` ("not reached").

Saved fraction = 1 - C_method(L*) / C_baseline(L*), ``None`` where either is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

KEYS = ("step", "flops")


def cost_to_reach(curve: Sequence[Mapping], target: float, key: str = "flops") -> float | None:
    """Cumulative ``key`` (``step`` or ``flops``) at the first evaluation with ``valid_loss <= target``,
    linearly
    interpolated from the evaluation before it; the first point's own cost if it is already there; ``None`` if
    no evaluation gets there (the module docstring states the rule)."""
    if key not in KEYS:
        raise ValueError(f"key must be one of {KEYS}, not {key!r}")
    if math.isnan(target):
        raise ValueError("target loss is NaN")
    prev = None
    for point in curve:
        loss = point["valid_loss"]
        if loss <= target:
            if prev is None:
                return float(point[key])
            frac = (prev["valid_loss"] - target) / (prev["valid_loss"] - loss)
            return float(prev[key] + frac * (point[key] - prev[key]))
        prev = point
    return None


def saved_fraction(method_cost: float | None, baseline_cost: float | None) -> float | None:
    """1 - method / baseline; ``None`` where either did not reach the target (or the baseline cost
    nothing)."""
    if method_cost is None or baseline_cost is None or baseline_cost <= 0:
        return None
    return 1.0 - method_cost / baseline_cost


def saved_to_reach(
    method: Sequence[Mapping], baseline: Sequence[Mapping], target: float, key: str = "flops"
) -> float | None:
    """The share of the baseline's compute to ``target`` that ``method`` does not need (``None``: one never
    got
    there)."""
    return saved_fraction(cost_to_reach(method, target, key), cost_to_reach(baseline, target, key))


def savings(baseline: Sequence[Mapping], method: Sequence[Mapping], target: float | None = None) -> dict:
    """Step- and FLOP-matched savings of ``method`` against ``baseline`` to reach ``target`` (default: the
    baseline's final validation loss), as the KI benchmark reports them.

    ``saved_step_matched`` / ``saved_flop_matched``: the saving where the method reached the target. Where it
    did not, the whole run was not enough, so the value is an upper bound, 1 - (the method's whole run) /
    C_baseline, and ``reached_*`` is False. Where the baseline itself does not reach the target (a target
    below its best evaluation), both are ``None``.
    """
    if target is None:
        target = baseline[-1]["valid_loss"]
    out: dict = {"target_loss": target}
    for key, name in (("step", "step_matched"), ("flops", "flop_matched")):
        c_base = cost_to_reach(baseline, target, key)
        c_method = cost_to_reach(method, target, key)
        if c_base is None or c_base <= 0:
            out[f"saved_{name}"], out[f"reached_{name}"] = None, c_method is not None
        elif c_method is None:
            out[f"saved_{name}"], out[f"reached_{name}"] = 1.0 - method[-1][key] / c_base, False
        else:
            out[f"saved_{name}"], out[f"reached_{name}"] = 1.0 - c_method / c_base, True
    return out


def saved_against(
    curves: Mapping[str, Sequence[Mapping]], reference: str, target: float | None = None, key: str = "flops"
) -> dict[str, float | None]:
    """For every curve but ``reference``: the share of the reference's compute to ``target`` (default: the
    reference's final validation loss) it does not need; ``None`` where it never gets there. Growth's table:
    the grown runs and the small model alone against the large model from scratch, by one rule."""
    ref = curves[reference]
    if target is None:
        target = ref[-1]["valid_loss"]
    c_ref = cost_to_reach(ref, target, key)
    return {
        name: saved_fraction(cost_to_reach(c, target, key), c_ref)
        for name, c in curves.items()
        if name != reference
    }


def target_sensitivity(
    baseline: Sequence[Mapping],
    method: Sequence[Mapping],
    deltas: Sequence[float] = (-0.02, 0.02),
    key: str = "step",
) -> dict[float, float | None]:
    """The saving to reach the baseline's final loss moved by each delta (nats): how much a headline saving
    depends on where one noisy final evaluation happened to land. ``None`` where one of them never gets
    there."""
    final = baseline[-1]["valid_loss"]
    return {d: saved_to_reach(method, baseline, final + d, key) for d in deltas}
