"""Carry Adam/AdamW state across a growth, so training continues instead of restarting.

ELLE builds a fresh optimizer after every growth; staged training and MSG carry the
state. This module maps ``exp_avg`` / ``exp_avg_sq`` (and ``max_exp_avg_sq`` for AMSGrad) through
the same :class:`~ray_lifelong.growth.plan.ParamPlan` that built the weights, and keeps ``step``.

Scaling rule. The moments are EMAs of the gradient and of its square. At a function-preserving
growth point the grown model's gradient is the old gradient gathered through the unit maps and
multiplied, per grown dimension, by :meth:`DimPlan.grad_scale`:

* a copy÷ dimension (a weight that *reads* a copied unit, stored divided by ``c``) sees the same
  input as before, so its gradient is **unchanged**;
* a plainly copied dimension (a weight or bias that *produces* a copied unit) is read downstream by
  divided weights, so each copy receives **1/c** of the old gradient.

So ``exp_avg`` is gathered and multiplied by that factor and ``exp_avg_sq`` by its square: the
carried moments are those the grown model would have accumulated on the same gradient history, and
they blend consistently with the gradients that follow (the unit test checks this against real
gradients). Dividing the moments of the *divided* weights instead would leave them ``c`` times too
small next to their (undivided) future gradients. Adam's update ``m / sqrt(v)`` is invariant to
that scale at the first step, so either choice gives the same first update; they differ in how the
history blends with new gradients.

Brand-new parameters (every parameter of an ``identity`` layer, whose gradient is zero at the
growth point apart from the zeroed projections, and the LayerNorm reset below it) start with zero
moments and ``step = 0``, exactly as a fresh AdamW would initialise them.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_lifelong.growth.plan import GrowthMapping, gather_moment

# Adam/AdamW per-parameter state: key -> power of the gradient it accumulates
_MOMENTS = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}


def _params_of(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]


@torch.no_grad()
def remap_optimizer_state(old_model: nn.Module, new_model: nn.Module, old_optimizer: torch.optim.Optimizer,
                          new_optimizer: torch.optim.Optimizer, mapping: GrowthMapping) -> None:
    """Fill ``new_optimizer``'s per-parameter state from ``old_optimizer``'s through ``mapping``.

    Parameters are matched by name (``named_parameters()``), so the two optimizers may group them
    differently (e.g. the decay / no-decay groups of ``build_optimizer``). Hyper-parameters, the
    learning rate and any scheduler are the caller's: only ``new_optimizer.state`` is written.

    Args:
        old_model: the model ``old_optimizer`` trained, as it was grown.
        new_model: the grown model, as returned with ``mapping`` by ``expand(..., return_mapping=True)``.
        old_optimizer: an Adam/AdamW over ``old_model``'s parameters; only read.
        new_optimizer: an Adam/AdamW over ``new_model``'s parameters, typically with no state yet;
            its state is replaced for every parameter derived from a parameter with state.
        mapping: the growth's :class:`GrowthMapping`.

    For a parameter of shape ``S'`` grown from one of shape ``S``: ``exp_avg`` ``S -> S'`` (gathered,
    times the gradient scale), ``exp_avg_sq`` ``S -> S'`` (times its square), ``step`` copied.

    Raises:
        ValueError: the optimizers hold parameters not in their model, the mapping does not
            describe ``new_model``, or a state entry is not Adam-like.
    """
    old_names = {id(p): n for n, p in old_model.named_parameters()}
    new_named = dict(new_model.named_parameters())
    if set(new_named) != set(mapping.plans):
        raise ValueError("the mapping does not describe new_model (parameter names differ)")
    stray = [p for p in _params_of(old_optimizer) if id(p) not in old_names]
    if stray:
        raise ValueError(f"old_optimizer holds {len(stray)} parameter(s) that are not in old_model")
    new_ids = {id(p) for p in new_named.values()}
    if any(id(p) not in new_ids for p in _params_of(new_optimizer)):
        raise ValueError("new_optimizer holds parameters that are not in new_model")
    in_new_opt = {id(p) for p in _params_of(new_optimizer)}

    old_state: dict[str, dict] = {}
    for p, st in old_optimizer.state.items():
        if st:
            old_state[old_names[id(p)]] = st
    if not old_state:
        return  # the old optimizer never stepped: nothing to carry
    template = next(iter(old_state.values()))

    for name, p in new_named.items():
        if id(p) not in in_new_opt:
            continue
        plan = mapping.plans[name]
        if plan.fresh_state:
            new_optimizer.state[p] = _fresh_state(template, p)
            continue
        st = old_state.get(plan.source or "")
        if st is None:
            continue  # the source had no state (never received a gradient): AdamW initialises lazily
        out = {}
        for key, val in st.items():
            if key == "step":
                out[key] = val.clone() if torch.is_tensor(val) else val
            elif key in _MOMENTS:
                out[key] = gather_moment(plan, val, _MOMENTS[key]).to(dtype=val.dtype, device=p.device)
                if out[key].shape != p.shape:
                    raise ValueError(f"{name}: mapped {key} has shape {tuple(out[key].shape)}, "
                                     f"parameter {tuple(p.shape)}")
            else:
                raise ValueError(f"unsupported optimizer state {key!r} (Adam/AdamW expected)")
        new_optimizer.state[p] = out


def _fresh_state(template: dict, p: nn.Parameter) -> dict:
    """What AdamW's lazy initialisation would create for ``p``: zero moments, ``step = 0``."""
    out = {}
    for key, val in template.items():
        if key == "step":
            out[key] = torch.zeros_like(val) if torch.is_tensor(val) else 0
        elif key in _MOMENTS:
            out[key] = torch.zeros(p.shape, dtype=val.dtype, device=p.device)
        else:
            raise ValueError(f"unsupported optimizer state {key!r} (Adam/AdamW expected)")
    return out
