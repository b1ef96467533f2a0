"""Growth plans: how every parameter of a grown model is built from the old model.

A growth is described once, as data, and then used twice: to build the grown parameters
(:func:`gather_value`) and to carry AdamW's moments onto them (:func:`gather_moment`, used by
:mod:`ray_lifelong.growth.optim`). Keeping the two on one description is what makes the optimizer
state consistent with the weights by construction.

Every grown dimension is a :class:`UnitMap` (new unit ``i`` copies old unit ``index[i]``) plus a flag
saying whether the copies are *divided* by their group size ("copy÷", Net2WiderNet / bert2BERT FPI,
spec §4.1) or plainly copied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class UnitMap:
    """Where each unit of one grown dimension comes from.

    Attributes:
        index: ``(n_new,)`` int64, the old unit each new unit copies; the first ``n_old`` entries
            are ``0..n_old-1`` except in fused maps (see :meth:`concat`).
        counts: ``(n_new,)`` int64, the size of the copy group of the old unit ``index[i]`` (the
            original plus its copies), i.e. ``c(j)`` of spec §4.1.
        is_new: ``(n_new,)`` bool, True for the appended copies (the slots that receive noise).
        n_old: the size of the dimension before growth.
    """

    index: Tensor
    counts: Tensor
    is_new: Tensor
    n_old: int

    @property
    def n_new(self) -> int:
        return int(self.index.numel())

    @property
    def grows(self) -> bool:
        return self.n_new != self.n_old

    @staticmethod
    def identity(n: int) -> UnitMap:
        """The map of a dimension that does not grow."""
        return UnitMap.from_copies(n, torch.zeros(0, dtype=torch.long))

    @staticmethod
    def from_copies(n_old: int, copies: Tensor) -> UnitMap:
        """Old units ``0..n_old-1`` followed by copies of the old units listed in ``copies``."""
        index = torch.cat([torch.arange(n_old), copies.to(torch.long)])
        counts = torch.bincount(index, minlength=n_old)[index]
        is_new = torch.arange(index.numel()) >= n_old
        return UnitMap(index, counts, is_new, n_old)

    def repeat_units(self, size: int) -> UnitMap:
        """Expand a map over groups (heads) into a map over their ``size`` members (head dims).

        Head ``h`` owns units ``h*size .. h*size+size-1``; a copied head copies all of them, and its
        units share the head's group count.
        """
        offs = torch.arange(size)
        index = (self.index[:, None] * size + offs).reshape(-1)
        return UnitMap(index, self.counts.repeat_interleave(size), self.is_new.repeat_interleave(size),
                       self.n_old * size)

    @staticmethod
    def concat(maps: Sequence[UnitMap]) -> UnitMap:
        """Maps of consecutive blocks of one fused dimension (GPT-2's ``c_attn`` columns = [q | k | v])."""
        offsets, n = [], 0
        for m in maps:
            offsets.append(n)
            n += m.n_old
        return UnitMap(torch.cat([m.index + o for m, o in zip(maps, offsets)]),
                       torch.cat([m.counts for m in maps]), torch.cat([m.is_new for m in maps]), n)


@dataclass(frozen=True)
class DimPlan:
    """One grown tensor dimension: a unit map and whether the copies are divided.

    ``divide=True`` is copy÷: the dimension *reads* the copied units (fan-in), so each copy holds
    ``1/c`` of the old weight and the sum over a copy group is unchanged (Net2Net). ``divide=False``
    is a plain copy: the dimension *produces* the copied units (fan-out, embeddings, LayerNorms).
    """

    units: UnitMap
    divide: bool

    def value_scale(self) -> Tensor:
        """``(n_new,)`` factor applied to the gathered weights: ``1/c`` for copy÷, else 1."""
        c = self.units.counts.to(torch.float32)
        return 1.0 / c if self.divide else torch.ones_like(c)

    def grad_scale(self) -> Tensor:
        """``(n_new,)`` factor relating the grown model's gradient to the old one (see optim.py).

        At a function-preserving point, a copy÷ weight sees the same input as the old weight, so its
        gradient is unchanged; a plainly copied unit is read by divided weights downstream, so each
        copy receives ``1/c`` of the old gradient. Hence ``value_scale * grad_scale == 1/c``.
        """
        c = self.units.counts.to(torch.float32)
        return torch.ones_like(c) if self.divide else 1.0 / c


@dataclass(frozen=True)
class ParamPlan:
    """How one parameter of the grown model is built.

    Attributes:
        source: name of the old parameter the value is gathered from (None only with ``fill``).
        dims: one entry per tensor dimension, None where the dimension does not grow.
        fill: a constant written instead of the gathered value (identity-layer constructions).
        fresh_state: the optimizer state starts from zero (new identity layers, re-initialised
            LayerNorms); otherwise the moments are gathered from ``source``'s state.
        new_layer: the parameter belongs to an inserted layer (every entry receives noise).
    """

    source: str | None
    dims: tuple[DimPlan | None, ...]
    fill: float | None = None
    fresh_state: bool = False
    new_layer: bool = False

    def __post_init__(self) -> None:
        if self.source is None and self.fill is None:
            raise ValueError("a ParamPlan needs a source or a fill value")


@dataclass(frozen=True)
class GrowthMapping:
    """Everything :func:`ray_lifelong.growth.expand` decided, enough to replay it on optimizer state.

    Attributes:
        arch: ``"bert"`` or ``"gpt2"``.
        old_sizes / new_sizes: ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
            ``intermediate_size`` before and after.
        layer_sources: for each layer of the grown model, the old layer it was built from.
        new_layers: for each layer of the grown model, whether it was inserted.
        hidden: the residual-stream unit map ``g`` shared by the whole model (spec §4.1).
        depth_init: ``"identity"`` or ``"copy"``.
        plans: one :class:`ParamPlan` per parameter name of the grown model
            (``named_parameters()``, so tied weights appear once).
    """

    arch: str
    old_sizes: Mapping[str, int]
    new_sizes: Mapping[str, int]
    layer_sources: tuple[int, ...]
    new_layers: tuple[bool, ...]
    hidden: UnitMap
    depth_init: str
    plans: Mapping[str, ParamPlan] = field(repr=False)


def balanced_copies(n_old: int, n_extra: int, generator: torch.Generator) -> Tensor:
    """Which old units the ``n_extra`` new units copy, as evenly as possible.

    Draws whole random permutations of ``0..n_old-1`` and takes the first ``n_extra`` entries, so
    copy counts differ by at most one. ELLE draws with replacement (spec §4.1); balancing changes
    no rule but makes integer-factor growth copy every unit equally often, which keeps LayerNorm
    statistics (and so the function) exact, and minimises their drift otherwise.

    Returns:
        ``(n_extra,)`` int64 old unit indices.
    """
    if n_extra <= 0:
        return torch.zeros(0, dtype=torch.long)
    rounds = -(-n_extra // n_old)
    perms = [torch.randperm(n_old, generator=generator) for _ in range(rounds)]
    return torch.cat(perms)[:n_extra]


def _scaled_gather(t: Tensor, dims: Sequence[DimPlan | None], scales: Sequence[Tensor | None]) -> Tensor:
    """Gather ``t`` (any shape) along every growing dim and multiply by a per-unit scale, in float32."""
    if len(dims) != t.ndim:
        raise ValueError(f"plan has {len(dims)} dims but tensor has shape {tuple(t.shape)}")
    # copy=True: with no growing dim (a layer copied by depth growth) `.to` would return the source's own
    # storage, and the copy would stay tied to its source layer (and to the input model) while training
    out = t.detach().to(torch.float32, copy=True)
    for d, (dp, s) in enumerate(zip(dims, scales)):
        if dp is None:
            continue
        if out.shape[d] != dp.units.n_old:
            raise ValueError(f"dim {d} of shape {tuple(t.shape)} is not the planned old size "
                             f"{dp.units.n_old}")
        out = out.index_select(d, dp.units.index.to(out.device))
        if s is not None:
            view = [1] * out.ndim
            view[d] = -1
            out = out * s.to(out.device).view(view)
    return out


def gather_value(plan: ParamPlan, old: Tensor | None, shape: torch.Size) -> Tensor:
    """The grown parameter's value (float32) without noise.

    Args:
        plan: the parameter's plan.
        old: the source parameter (old shape), or None for a ``fill`` plan.
        shape: the grown parameter's shape.
    """
    if plan.fill is not None:
        return torch.full(tuple(shape), plan.fill, dtype=torch.float32,
                          device=old.device if old is not None else None)
    assert old is not None
    scales = [None if d is None else (d.value_scale() if d.divide else None) for d in plan.dims]
    return _scaled_gather(old, plan.dims, scales)


def gather_moment(plan: ParamPlan, moment: Tensor, power: int) -> Tensor:
    """An optimizer moment of the source parameter mapped onto the grown parameter (float32).

    ``power`` is 1 for first moments (EMA of g) and 2 for second moments (EMA of g**2): the mapped
    moment is what the EMA would be had the same gradients been computed in the grown model, whose
    gradient is the old one gathered and multiplied by :meth:`DimPlan.grad_scale`.
    """
    scales = [None if d is None else d.grad_scale() ** power for d in plan.dims]
    return _scaled_gather(moment, plan.dims, scales)


def noise_mask(plan: ParamPlan, shape: torch.Size) -> Tensor:
    """``shape`` bool mask of the entries that receive symmetry-breaking noise (spec §6).

    All entries of an inserted layer; otherwise the entries that belong to at least one new
    (copied) unit along some dimension. Original entries of original layers are never touched.
    """
    if plan.new_layer:
        return torch.ones(tuple(shape), dtype=torch.bool)
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    for d, dp in enumerate(plan.dims):
        if dp is None:
            continue
        view = [1] * len(shape)
        view[d] = -1
        mask = mask | dp.units.is_new.view(view)
    return mask
