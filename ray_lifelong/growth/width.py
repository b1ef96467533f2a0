"""Width growth rules (hidden size, attention heads, FFN size) for BERT, RoBERTa and GPT-2.

The rules are those of bert2BERT's function-preserving initialisation as ELLE's reference HF
script intends them, *not* the bugs of ELLE's official width code (a double division of the
tied embedding and of the output layer):

* units are copied, weights that *read* a copied unit are divided by its group size (copy÷);
* the tied output embedding stays the plainly copied input embedding, and the division moves to
  the affine of the last LayerNorm before it (BERT's MLM-head LayerNorm, GPT-2's ``ln_f``), so the
  logits are a sum over copy groups of ``(gamma/c)*x*E`` = the old sum;
* when the output layer is not tied, the output matrix is divided instead and that LayerNorm is
  plainly copied.

Each rule names, per tensor dimension, which unit map applies and whether it divides:

==========  =========================================================================
``d``       residual stream (hidden) units, copied
``d/``      residual stream units, copy÷ (fan-in)
``a`` ``a/``  attention units (heads x head_dim, whole heads copied), copied / copy÷
``qkv``     GPT-2's fused ``c_attn`` output = [q | k | v], each block as ``a``
``f`` ``f/``  FFN units, copied / copy÷
``None``    not grown (vocabulary, positions, token types)
==========  =========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ray_lifelong.growth.plan import DimPlan, UnitMap

Rule = tuple[str | None, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Parameter layout of one supported architecture.

    Attributes:
        name: ``"bert"``, ``"roberta"`` or ``"gpt2"``.
        layer_prefix: prefix of the per-layer parameters, followed by ``{index}.``.
        layer_rules: rule per parameter name relative to its layer.
        top_rules: rule per full parameter name outside the layers.
    """

    name: str
    layer_prefix: str
    layer_rules: Mapping[str, Rule]
    top_rules: Mapping[str, Rule]


def _bert_layer_rules() -> dict[str, Rule]:
    """BERT's post-LN layer, which RoBERTa shares under its own prefix."""
    return {
        # nn.Linear weights are (out, in): rows produce units, columns read them
        "attention.self.query.weight": ("a", "d/"), "attention.self.query.bias": ("a",),
        "attention.self.key.weight": ("a", "d/"), "attention.self.key.bias": ("a",),
        "attention.self.value.weight": ("a", "d/"), "attention.self.value.bias": ("a",),
        "attention.output.dense.weight": ("d", "a/"), "attention.output.dense.bias": ("d",),
        "attention.output.LayerNorm.weight": ("d",), "attention.output.LayerNorm.bias": ("d",),
        "intermediate.dense.weight": ("f", "d/"), "intermediate.dense.bias": ("f",),
        "output.dense.weight": ("d", "f/"), "output.dense.bias": ("d",),
        "output.LayerNorm.weight": ("d",), "output.LayerNorm.bias": ("d",),
    }


def _bert_spec(tied: bool) -> ArchSpec:
    head_ln: Rule = ("d/",) if tied else ("d",)
    top = {
        "bert.embeddings.word_embeddings.weight": (None, "d"),
        "bert.embeddings.position_embeddings.weight": (None, "d"),
        "bert.embeddings.token_type_embeddings.weight": (None, "d"),
        "bert.embeddings.LayerNorm.weight": ("d",), "bert.embeddings.LayerNorm.bias": ("d",),
        "cls.predictions.transform.dense.weight": ("d", "d/"),
        "cls.predictions.transform.dense.bias": ("d",),
        # the last LayerNorm before the (tied) decoder takes the division
        "cls.predictions.transform.LayerNorm.weight": head_ln,
        "cls.predictions.transform.LayerNorm.bias": head_ln,
        "cls.predictions.bias": (None,),
        "cls.predictions.decoder.bias": (None,),
    }
    if not tied:
        top["cls.predictions.decoder.weight"] = (None, "d/")
    return ArchSpec("bert", "bert.encoder.layer.", _bert_layer_rules(), top)


def _roberta_spec(tied: bool) -> ArchSpec:
    """RoBERTa is BERT under ``roberta.`` with its MLM head named ``lm_head`` (dense, layer_norm, decoder,
    bias); its position ids start after the padding index, which growth does not touch."""
    head_ln: Rule = ("d/",) if tied else ("d",)
    top = {
        "roberta.embeddings.word_embeddings.weight": (None, "d"),
        "roberta.embeddings.position_embeddings.weight": (None, "d"),
        "roberta.embeddings.token_type_embeddings.weight": (None, "d"),
        "roberta.embeddings.LayerNorm.weight": ("d",), "roberta.embeddings.LayerNorm.bias": ("d",),
        "lm_head.dense.weight": ("d", "d/"),
        "lm_head.dense.bias": ("d",),
        "lm_head.layer_norm.weight": head_ln,
        "lm_head.layer_norm.bias": head_ln,
        "lm_head.bias": (None,),
        "lm_head.decoder.bias": (None,),
    }
    if not tied:
        top["lm_head.decoder.weight"] = (None, "d/")
    return ArchSpec("roberta", "roberta.encoder.layer.", _bert_layer_rules(), top)


def _gpt2_spec(tied: bool) -> ArchSpec:
    layer = {
        # Conv1D weights are (in, out): the transpose of nn.Linear
        "ln_1.weight": ("d",), "ln_1.bias": ("d",),
        "attn.c_attn.weight": ("d/", "qkv"), "attn.c_attn.bias": ("qkv",),
        "attn.c_proj.weight": ("a/", "d"), "attn.c_proj.bias": ("d",),
        "ln_2.weight": ("d",), "ln_2.bias": ("d",),
        "mlp.c_fc.weight": ("d/", "f"), "mlp.c_fc.bias": ("f",),
        "mlp.c_proj.weight": ("f/", "d"), "mlp.c_proj.bias": ("d",),
    }
    # ELLE's GPT code copies ln_f without division although the output is tied, so copied units
    # count c times in the logits: divide ln_f instead.
    final_ln: Rule = ("d/",) if tied else ("d",)
    top = {
        "transformer.wte.weight": (None, "d"),
        "transformer.wpe.weight": (None, "d"),
        "transformer.ln_f.weight": final_ln, "transformer.ln_f.bias": final_ln,
    }
    if not tied:
        top["lm_head.weight"] = (None, "d/")
    return ArchSpec("gpt2", "transformer.h.", layer, top)


def arch_spec(arch: str, tied: bool) -> ArchSpec:
    """The :class:`ArchSpec` of ``arch`` (``"bert"``, ``"roberta"`` or ``"gpt2"``) with a tied or untied
    output layer."""
    if arch == "bert":
        return _bert_spec(tied)
    if arch == "roberta":
        return _roberta_spec(tied)
    if arch == "gpt2":
        return _gpt2_spec(tied)
    raise ValueError(f"unknown architecture {arch!r}")


@dataclass(frozen=True)
class LayerUnits:
    """The unit maps one layer position uses: attention units (heads x head_dim) and FFN units."""

    attn: UnitMap
    ffn: UnitMap


def dims_for(rule: Rule, hidden: UnitMap, layer: LayerUnits | None, name: str) -> tuple[DimPlan | None, ...]:
    """Turn a rule (one symbol per dimension) into :class:`DimPlan` entries.

    Args:
        rule: e.g. ``("a", "d/")``.
        hidden: the model-wide residual map.
        layer: the layer's maps (None outside the layers).
        name: the parameter name, for error messages.
    """
    out: list[DimPlan | None] = []
    for sym in rule:
        if sym is None:
            out.append(None)
            continue
        divide = sym.endswith("/")
        key = sym.rstrip("/")
        if key == "d":
            units = hidden
        elif layer is None:
            raise ValueError(f"{name}: rule {sym!r} needs a layer")
        elif key == "a":
            units = layer.attn
        elif key == "f":
            units = layer.ffn
        elif key == "qkv":
            units = UnitMap.concat([layer.attn] * 3)
        else:  # pragma: no cover - rules are static
            raise ValueError(f"{name}: unknown rule symbol {sym!r}")
        # a dimension that does not grow has all counts 1: gathering and dividing are no-ops
        out.append(DimPlan(units, divide) if units.grows else None)
    return tuple(out)
