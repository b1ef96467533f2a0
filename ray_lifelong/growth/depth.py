"""Depth growth: where new layers go and how they are initialised.

Placement:

* ``interleave``: ELLE's scheme. Chosen layers are duplicated and each copy is inserted directly
  above its source. Sources are drawn without replacement while there are enough layers (ELLE's
  "no layer duplicated twice in a round" invariant, within one call); beyond ``L`` new layers every
  layer is duplicated ``floor(k/L)`` or ``ceil(k/L)`` times.
* ``top``: StackBERT-like: new layers are stacked on top, copying the top ``k`` layers in order
  (cyclically when ``k > L``).

Initialisation:

* ``copy``: the new layer is a copy of its source (ELLE). Not function-preserving: a layer applied twice
  is not the layer applied once.
* ``identity``: the new layer computes the identity at the growth point, exactly.

  - Pre-LN GPT-2 block ``y = h + M(ln_2(h))``, ``h = x + A(ln_1(x))``: with the output projections
    ``attn.c_proj`` and ``mlp.c_proj`` (weight and bias) set to zero, ``A`` and ``M`` output 0, so
    ``y = x`` bit for bit.
  - Post-LN BERT block ``a = LN_1(x + A(x))``, ``y = LN_2(a + M(a))``: zeroing ``A``'s and ``M``'s
    output projections leaves ``y = LN_2(LN_1(x))``, which is not ``x``. But ``x`` itself is the
    output ``gamma*n(z) + beta`` of the LayerNorm that ends the block below (``n`` = normalisation
    without affine). Move that affine *up*: the block below ends with ``n(z)`` (gamma=1, beta=0), the
    new block's ``LN_1`` has gamma=1, beta=0 and its ``LN_2`` takes the old (gamma, beta). Then
    ``y = gamma*n(n(n(z))) + beta``; ``n(z)`` already has mean 0 and variance ``v/(v+eps)``, so
    normalising it again changes it by a relative ``O(eps/v)`` (eps = 1e-12 in BERT): ``y`` equals
    the old ``x`` and everything above is unchanged. Several new layers in a row pass the affine
    along the chain, so only the last one carries it. The only old parameters touched are the
    affine of the LayerNorm right below each inserted layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ray_lifelong.growth.plan import ParamPlan, balanced_copies

DEPTH_INITS = ("identity", "copy")
DEPTH_PLACEMENTS = ("interleave", "top")

# parameters (relative to a layer) that an identity layer zeroes: the blocks' output projections
_GPT2_ZERO = ("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
_BERT_ZERO = ("attention.output.dense.weight", "attention.output.dense.bias",
              "output.dense.weight", "output.dense.bias")
_BERT_IN_LN = "attention.output.LayerNorm."
_BERT_OUT_LN = "output.LayerNorm."
_POST_LN = ("bert", "roberta")
"""Post-LN encoders (RoBERTa is BERT's layout under ``roberta.``)."""


def layer_sources(n_old: int, n_new: int, placement: str, generator: torch.Generator,
                  sources: Sequence[int] | None = None) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The layer stack after depth growth.

    Args:
        n_old: number of layers before growth.
        n_new: number of layers after growth (``>= n_old``).
        placement: ``"interleave"`` or ``"top"``.
        generator: draws the duplicated layers for ``interleave``.
        sources: the old layers to duplicate (``n_new - n_old`` indices), overriding the draw;
            lets a caller keep ELLE's cross-stage ``layer_candidates`` bookkeeping.

    Returns:
        ``(src, new)``: for each grown layer, the old layer it is built from and whether it is new.
    """
    k = n_new - n_old
    if placement not in DEPTH_PLACEMENTS:
        raise ValueError(f"depth_placement must be one of {DEPTH_PLACEMENTS}, got {placement!r}")
    if sources is not None:
        chosen = [int(s) for s in sources]
        if len(chosen) != k or any(not 0 <= s < n_old for s in chosen):
            raise ValueError(f"depth_sources must list {k} layer indices in [0, {n_old}), "
                             f"got {list(sources)}")
    elif placement == "interleave":
        chosen = balanced_copies(n_old, k, generator).tolist()
    else:
        chosen = [(n_old - k + i) % n_old for i in range(k)]
    src: list[int] = []
    new: list[bool] = []
    if placement == "interleave":
        for layer in range(n_old):
            src.append(layer)
            new.append(False)
            copies = chosen.count(layer)
            src.extend([layer] * copies)
            new.extend([True] * copies)
    else:
        src, new = list(range(n_old)) + chosen, [False] * n_old + [True] * k
    return tuple(src), tuple(new)


def apply_identity_init(arch: str, plans: dict[str, ParamPlan], layer_prefix: str,
                        new_layers: Sequence[bool]) -> dict[str, ParamPlan]:
    """Rewrite the plans of inserted layers so that each computes the identity (module docstring).

    Args:
        arch: ``"bert"``, ``"roberta"`` or ``"gpt2"``.
        plans: plans of the grown model's parameters, the new layers planned as copies.
        layer_prefix: e.g. ``"transformer.h."``.
        new_layers: for each grown layer, whether it was inserted.

    Returns:
        A new dict; ``plans`` is not modified. Every parameter of an identity layer starts with a
        fresh optimizer state (its gradient at the growth point is zero except for the zeroed
        projections), except the LayerNorm affine moved into it, which carries its state along.
    """
    out = dict(plans)
    for p, is_new in enumerate(new_layers):
        if not is_new:
            continue
        pre = f"{layer_prefix}{p}."
        for name in [n for n in out if n.startswith(pre)]:
            local = name[len(pre):]
            zero = local in (_GPT2_ZERO if arch == "gpt2" else _BERT_ZERO)
            out[name] = replace(out[name], fill=0.0 if zero else None, fresh_state=True)
        if arch not in _POST_LN:
            continue
        below = f"{layer_prefix}{p - 1}.{_BERT_OUT_LN}" if p > 0 else f"{arch}.embeddings.LayerNorm."
        for part, unit in (("weight", 1.0), ("bias", 0.0)):
            out[pre + _BERT_IN_LN + part] = replace(out[pre + _BERT_IN_LN + part], fill=unit)
            # the affine of the LayerNorm below moves up into this layer's last LayerNorm ...
            out[pre + _BERT_OUT_LN + part] = replace(out[below + part], new_layer=True)
            # ... and the one below becomes a plain normalisation
            out[below + part] = replace(out[below + part], fill=unit, fresh_state=True)
    return out
