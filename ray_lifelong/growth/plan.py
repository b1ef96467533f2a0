"""Growth plans: how every parameter of a grown model is built from the old model.

A growth is described once, as data, and then used twice: to build the grown parameters
(:func:`gather_value`) and to carry AdamW's moments onto them (:func:`gather_moment`, used by
:mod:`ray_lifelong.growth.optim`). Keeping the two on one description is what makes the optimizer
state consistent with the weights by construction.

Every grown dimension is a :class:`UnitMap` (new unit ``i`` copies old unit ``index[i]``) plus a flag
saying whether the copies are *divided* by their group size ("copy÷", Net2WiderNet / bert2BERT FPI)
or plainly copied.
A unit with ``index[i] == -1`` copies nothing: it is added afresh (the zero-write growth of
Llama-family models), gathers as zero, is initialised by the grower and starts with zero optimizer
moments.
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
        index: ``(n_new,)`` int64, the old unit each new unit copies, or -1 for a unit added afresh;
            the first ``n_old`` entries are ``0..n_old-1`` except in fused maps (see :meth:`concat`)
            and in maps built by :meth:`placed`.
        counts: ``(n_new,)`` int64, the size of the copy group of the old unit ``index[i]`` (the
            original plus its copies), i.e. ``c(j)`` of bert2BERT's FPI
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
    def placed(n_old: int, index: Tensor) -> UnitMap:
        """Old units moved to new places, every other unit added afresh (``index[i] == -1``).

        Nothing is copied, so every old unit must appear exactly once (group size 1).
        """
        index = index.to(torch.long)
        kept = index[index >= 0]
        if kept.numel() != n_old or not torch.equal(torch.sort(kept).values, torch.arange(n_old)):
            raise ValueError(f"a placed map must hold each of the {n_old} old units exactly once")
        return UnitMap(index, torch.ones_like(index), index < 0, n_old)

    @property
    def has_fresh(self) -> bool:
        """Whether some unit is added afresh rather than copied."""
        return bool((self.index < 0).any())

    @property
    def is_appended(self) -> bool:
        """Old units kept in place and only fresh units after them (gathering is then a padding)."""
        n = self.n_old
        return (self.n_new >= n and torch.equal(self.index[:n], torch.arange(n))
                and bool((self.index[n:] < 0).all()))

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
        scale: the gathered value is multiplied by it. Only for a rescaling that the growth
            compensates exactly (RMSNorm gains times ``sqrt(d/d')`` over a norm whose statistic
            shrinks by the same factor): the parameter then affects the function through
            ``scale * value / scale``, so its gradient is the old one divided by ``scale``.
    """

    source: str | None
    dims: tuple[DimPlan | None, ...]
    fill: float | None = None
    fresh_state: bool = False
    new_layer: bool = False
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.source is None and self.fill is None:
            raise ValueError("a ParamPlan needs a source or a fill value")


@dataclass(frozen=True)
class GrowthMapping:
    """Everything :func:`ray_lifelong.growth.expand` decided, enough to replay it on optimizer state.

    Attributes:
        arch: ``"bert"``, ``"roberta"``, ``"gpt2"``, ``"llama"``, ``"mistral"`` or ``"qwen2"``.
        old_sizes / new_sizes: ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
            ``intermediate_size`` (and ``num_key_value_heads`` for Llama-family models) before and after.
        layer_sources: for each layer of the grown model, the old layer it was built from.
        new_layers: for each layer of the grown model, whether it was inserted.
        hidden: the residual-stream unit map ``g`` shared by the whole model.
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
    copy counts differ by at most one. ELLE draws with replacement; balancing changes
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
    padded = []
    for d, (dp, s) in enumerate(zip(dims, scales)):
        if dp is None:
            continue
        if dp.units.is_appended:
            # old units in place, fresh ones after: one zero-padding at the end instead of a gather per dim
            if out.shape[d] != dp.units.n_old:
                raise ValueError(f"dim {d} of shape {tuple(t.shape)} is not the planned old size "
                                 f"{dp.units.n_old}")
            if s is not None:
                view = [1] * out.ndim
                view[d] = -1
                out.mul_(s[:dp.units.n_old].to(out.device).view(view))
            padded.append((d, dp.units.n_new))
            continue
        if out.shape[d] != dp.units.n_old:
            raise ValueError(f"dim {d} of shape {tuple(t.shape)} is not the planned old size "
                             f"{dp.units.n_old}")
        index = dp.units.index.to(out.device)
        fresh = dp.units.has_fresh
        out = out.index_select(d, index.clamp(min=0) if fresh else index)
        view = [1] * out.ndim
        view[d] = -1
        if s is not None:
            out = out * s.to(out.device).view(view)
        if fresh:
            # a unit added afresh has no old value and no history: zero here, initialised by the grower
            out.masked_fill_((index < 0).view(view), 0.0)
    if padded:
        shape = list(out.shape)
        for d, n in padded:
            shape[d] = n
        full = out.new_zeros(shape)
        block = full
        for d in range(out.ndim):
            block = block.narrow(d, 0, out.shape[d])
        block.copy_(out)
        out = full
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
    out = _scaled_gather(old, plan.dims, scales)
    return out.mul_(plan.scale) if plan.scale != 1.0 else out


def gather_moment(plan: ParamPlan, moment: Tensor, power: int) -> Tensor:
    """An optimizer moment of the source parameter mapped onto the grown parameter (float32).

    ``power`` is 1 for first moments (EMA of g) and 2 for second moments (EMA of g**2): the mapped
    moment is what the EMA would be had the same gradients been computed in the grown model, whose
    gradient is the old one gathered and multiplied by :meth:`DimPlan.grad_scale` (and divided by
    :attr:`ParamPlan.scale`). Units added afresh get zero moments, as a fresh AdamW would give them.
    """
    scales = [None if d is None else d.grad_scale() ** power for d in plan.dims]
    out = _scaled_gather(moment, plan.dims, scales)
    return out.mul_(plan.scale ** -power) if plan.scale != 1.0 else out


def noise_mask(plan: ParamPlan, shape: torch.Size) -> Tensor:
    """``shape`` bool mask of the entries that receive symmetry-breaking noise.

    All entries of an inserted layer; otherwise the entries that belong to at least one new
    (copied) unit along some dimension. Original entries of original layers are never touched.
    With copies, the noised entries are exactly the added ones.
    """
    return added_mask(plan, shape)


def unit_mask(plan: ParamPlan, shape: torch.Size) -> Tensor:
    """``shape`` bool mask of the entries that belong to at least one new unit along some dimension."""
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    for d, dp in enumerate(plan.dims):
        if dp is None:
            continue
        view = [1] * len(shape)
        view[d] = -1
        mask = mask | dp.units.is_new.view(view)
    return mask


GROWTH_TRAIN = ("all", "new")
"""What the stage after a growth trains: every parameter, or only the entries the growth added (LLaMA Pro's
recipe, :func:`new_entry_masks`)."""


def added_mask(plan: ParamPlan, shape: torch.Size) -> Tensor:
    """``shape`` bool mask of the entries the growth added: every entry of an inserted layer, and
    otherwise the entries of new units (copied or fresh). The rest are the old model's entries, moved
    or, for RMSNorm gains, rescaled."""
    if plan.new_layer:
        return torch.ones(tuple(shape), dtype=torch.bool)
    return unit_mask(plan, shape)


def new_entry_masks(model: torch.nn.Module, mapping: GrowthMapping) -> dict[str, Tensor]:
    """Per parameter of the grown ``model`` (``named_parameters()`` names), a bool mask of the entries
    the growth added (see :func:`added_mask`); freezing the rest trains only what was added, as in
    LLaMA Pro's recipe.

    Raises:
        ValueError: ``mapping`` does not describe ``model``.
    """
    named = dict(model.named_parameters())
    if set(named) != set(mapping.plans):
        raise ValueError("the mapping does not describe this model (parameter names differ)")
    return {name: added_mask(mapping.plans[name], p.shape).to(p.device) for name, p in named.items()}
