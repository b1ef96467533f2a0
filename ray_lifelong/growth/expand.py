"""The public growth operator: :func:`expand` a BERT, RoBERTa or GPT-2 model in width and depth.

Width and depth are done in one pass, as in ELLE: every layer position of the grown
model takes its source layer from the depth plan and then applies the width rules with its own
head and FFN maps (redrawn per layer position); the residual map ``g`` is shared by the
whole model. The input model is only read; the grown model is built on the meta device (no random
init, no global RNG use) and then filled.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, overload

import torch
from torch import nn

from ray_lifelong.growth.depth import DEPTH_INITS, DEPTH_PLACEMENTS, apply_identity_init, layer_sources
from ray_lifelong.growth.llama import SUPPORTED as LLAMA_SUPPORTED
from ray_lifelong.growth.llama import expand_llama, llama_arch, llama_sizes
from ray_lifelong.growth.plan import (
    GrowthMapping,
    ParamPlan,
    UnitMap,
    balanced_copies,
    gather_value,
    noise_mask,
)
from ray_lifelong.growth.width import ArchSpec, LayerUnits, arch_spec, dims_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SIZE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


def _model_arch(model: nn.Module) -> str:
    """``"bert"`` for ``BertForMaskedLM``, ``"roberta"`` for ``RobertaForMaskedLM``, ``"gpt2"`` for
    ``GPT2LMHeadModel``; ValueError otherwise."""
    from transformers import BertForMaskedLM, GPT2LMHeadModel, RobertaForMaskedLM

    if isinstance(model, BertForMaskedLM):
        return "bert"
    if isinstance(model, RobertaForMaskedLM):
        return "roberta"
    if isinstance(model, GPT2LMHeadModel):
        return "gpt2"
    raise ValueError(f"cannot grow a {type(model).__name__}: supported are BertForMaskedLM, "
                     "RobertaForMaskedLM, GPT2LMHeadModel, " + ", ".join(LLAMA_SUPPORTED))


def model_sizes(model: PreTrainedModel) -> dict[str, int]:
    """The growable sizes of a supported model (GPT-2's ``n_inner=None`` means ``4 * n_embd``); Llama-family
    models also have ``num_key_value_heads``."""
    if llama_arch(model) is not None:
        return llama_sizes(model)
    arch = _model_arch(model)
    c = model.config
    if arch == "gpt2":
        ffn = c.n_inner if c.n_inner is not None else 4 * c.n_embd
        return {"num_hidden_layers": c.n_layer, "hidden_size": c.n_embd, "num_attention_heads": c.n_head,
                "intermediate_size": ffn}
    return {k: int(getattr(c, k)) for k in SIZE_KEYS}


def _is_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _resolve_sizes(old: dict[str, int], num_hidden_layers: int | None, hidden_size: int | None,
                   num_attention_heads: int | None, intermediate_size: int | None) -> dict[str, int]:
    """Target sizes, with the head size kept fixed; raises ValueError for impossible targets."""
    for key, val in zip(SIZE_KEYS, (num_hidden_layers, hidden_size, num_attention_heads, intermediate_size)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
            raise ValueError(f"{key} must be a positive int, got {val!r}")
    head = old["hidden_size"] // old["num_attention_heads"]
    hidden = hidden_size
    heads = num_attention_heads
    # hidden = heads * head_size in HF BERT/GPT-2, so with a fixed head size either one fixes the other
    if hidden is None:
        hidden = old["hidden_size"] if heads is None else heads * head
    if heads is None:
        if hidden % head:
            raise ValueError(f"hidden_size {hidden} is not a multiple of the head size {head}, "
                             "which growth keeps fixed")
        heads = hidden // head
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if hidden // heads != head:
        raise ValueError(f"hidden_size {hidden} / num_attention_heads {heads} = head size {hidden // heads}, "
                         f"but growth keeps the head size at {head} (new heads are added instead)")
    new = {"num_hidden_layers": num_hidden_layers or old["num_hidden_layers"], "hidden_size": hidden,
           "num_attention_heads": heads, "intermediate_size": intermediate_size or old["intermediate_size"]}
    shrunk = [f"{k} {old[k]} -> {new[k]}" for k in SIZE_KEYS if new[k] < old[k]]
    if shrunk:
        raise ValueError("growth cannot shrink a model: " + ", ".join(shrunk))
    return new


def _grown_config(model: nn.Module, arch: str, sizes: dict[str, int]):
    cfg = copy.deepcopy(model.config)
    if arch in ("bert", "roberta"):
        for k in SIZE_KEYS:
            setattr(cfg, k, sizes[k])
    else:
        cfg.n_layer, cfg.n_embd, cfg.n_head = sizes["num_hidden_layers"], sizes["hidden_size"], \
            sizes["num_attention_heads"]
        if not (cfg.n_inner is None and sizes["intermediate_size"] == 4 * sizes["hidden_size"]):
            cfg.n_inner = sizes["intermediate_size"]
    return cfg


def _check_supported(model: nn.Module, arch: str, deeper: bool) -> None:
    c = model.config
    if arch == "gpt2":
        if getattr(c, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not supported")
        if deeper and getattr(c, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("depth growth of a GPT-2 with scale_attn_by_inverse_layer_idx=True cannot "
                             "preserve the function (the attention scale depends on the layer index)")
    elif getattr(c, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError("only absolute position embeddings are supported")


def _plan(spec: ArchSpec, new_names: list[str], hidden: UnitMap, units: list[LayerUnits],
          src: tuple[int, ...], new: tuple[bool, ...]) -> dict[str, ParamPlan]:
    """One plan per grown parameter, new layers planned as copies of their sources."""
    plans: dict[str, ParamPlan] = {}
    for name in new_names:
        if name.startswith(spec.layer_prefix):
            idx, local = name[len(spec.layer_prefix):].split(".", 1)
            p = int(idx)
            rule = spec.layer_rules.get(local)
            if rule is None:
                raise ValueError(f"do not know how to grow parameter {name!r}")
            plans[name] = ParamPlan(source=f"{spec.layer_prefix}{src[p]}.{local}",
                                    dims=dims_for(rule, hidden, units[p], name), new_layer=new[p])
        else:
            rule = spec.top_rules.get(name)
            if rule is None:
                raise ValueError(f"do not know how to grow parameter {name!r}")
            plans[name] = ParamPlan(source=name, dims=dims_for(rule, hidden, None, name))
    return plans


def _old_name(spec: ArchSpec, name: str, src: tuple[int, ...]) -> str:
    if name.startswith(spec.layer_prefix):
        idx, local = name[len(spec.layer_prefix):].split(".", 1)
        return f"{spec.layer_prefix}{src[int(idx)]}.{local}"
    return name


@overload
def expand(model: PreTrainedModel, *, num_hidden_layers: int | None = ..., hidden_size: int | None = ...,
           num_attention_heads: int | None = ..., intermediate_size: int | None = ...,
           num_key_value_heads: int | None = ..., head_dim: int | None = ...,
           depth_init: str = ..., depth_placement: str = ..., noise_std: float = ..., seed: int = ...,
           depth_sources: Sequence[int] | None = ..., return_mapping: Literal[False] = ...
           ) -> PreTrainedModel: ...


@overload
def expand(model: PreTrainedModel, *, num_hidden_layers: int | None = ..., hidden_size: int | None = ...,
           num_attention_heads: int | None = ..., intermediate_size: int | None = ...,
           num_key_value_heads: int | None = ..., head_dim: int | None = ...,
           depth_init: str = ..., depth_placement: str = ..., noise_std: float = ..., seed: int = ...,
           depth_sources: Sequence[int] | None = ..., return_mapping: Literal[True]
           ) -> tuple[PreTrainedModel, GrowthMapping]: ...


@torch.no_grad()
def expand(model: PreTrainedModel, *, num_hidden_layers: int | None = None, hidden_size: int | None = None,
           num_attention_heads: int | None = None, intermediate_size: int | None = None,
           num_key_value_heads: int | None = None, head_dim: int | None = None,
           depth_init: str = "identity", depth_placement: str = "interleave", noise_std: float = 0.0,
           seed: int = 0, depth_sources: Sequence[int] | None = None, return_mapping: bool = False
           ) -> PreTrainedModel | tuple[PreTrainedModel, GrowthMapping]:
    """Grow a ``BertForMaskedLM``, ``RobertaForMaskedLM`` or ``GPT2LMHeadModel`` in width and depth,
    preserving its function.

    ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM`` are grown by
    :func:`ray_lifelong.growth.llama.expand_llama` instead (exact for any sizes, no copies; see there,
    also for what ``noise_std`` does for them).

    Width follows bert2BERT/Net2Net FPI: the hidden size, the
    heads (head size fixed) and the FFN size grow by copying units; weights that read a copied unit
    are divided by its copy count; the tied output embedding is compensated at the last LayerNorm.
    When every unit is copied equally often (integer growth factor; copies are drawn balanced) the
    grown model computes the same logits; otherwise LayerNorm statistics shift slightly.
    Depth inserts layers (see :mod:`ray_lifelong.growth.depth`), exactly with ``identity``.

    Args:
        model: the model to grow; only read (its parameters, buffers, mode and the global RNG are
            left as they were).
        num_hidden_layers: target layer count (None: unchanged).
        hidden_size: target hidden size (None: ``num_attention_heads * head_size`` or unchanged).
        num_attention_heads: target head count (None: ``hidden_size / head_size``).
        intermediate_size: target FFN size (None: unchanged).
        num_key_value_heads: Llama-family only: target KV head count (None: unchanged).
        head_dim: Llama-family only: the head size, which must stay what it is.
        depth_init: ``"identity"`` (exact) or ``"copy"`` (ELLE, approximate).
        depth_placement: ``"interleave"`` (ELLE: copy right above its source) or ``"top"``.
        noise_std: std of the Gaussian noise added to new/copied entries only.
        seed: seeds the unit maps, the duplicated layers and the noise: the same seed gives the
            same model on every rank.
        depth_sources: explicit old layers to duplicate instead of drawing them.
        return_mapping: also return the :class:`GrowthMapping` (needed by
            :func:`ray_lifelong.growth.remap_optimizer_state`).

    Returns:
        A new model of the same class, device, dtype and train/eval mode, with the target sizes
        (and the mapping when ``return_mapping``).

    Raises:
        ValueError: unknown architecture, shrinking, a hidden size not divisible by the head count,
            a changing head size, or an unknown ``depth_init`` / ``depth_placement``.
    """
    if llama_arch(model) is not None:
        return expand_llama(model, num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
                            num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                            intermediate_size=intermediate_size, head_dim=head_dim, depth_init=depth_init,
                            depth_placement=depth_placement, noise_std=noise_std, seed=seed,
                            depth_sources=depth_sources, return_mapping=return_mapping)
    arch = _model_arch(model)
    if num_key_value_heads is not None or head_dim is not None:
        raise ValueError("num_key_value_heads and head_dim apply to Llama-family models only")
    if depth_init not in DEPTH_INITS:
        raise ValueError(f"depth_init must be one of {DEPTH_INITS}, got {depth_init!r}")
    if depth_placement not in DEPTH_PLACEMENTS:
        raise ValueError(f"depth_placement must be one of {DEPTH_PLACEMENTS}, got {depth_placement!r}")
    if not noise_std >= 0.0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    old_sizes = model_sizes(model)
    sizes = _resolve_sizes(old_sizes, num_hidden_layers, hidden_size, num_attention_heads, intermediate_size)
    _check_supported(model, arch, sizes["num_hidden_layers"] > old_sizes["num_hidden_layers"])
    tied = _is_tied(model)
    spec = arch_spec(arch, tied)
    head = old_sizes["hidden_size"] // old_sizes["num_attention_heads"]

    # all random draws come from one seeded CPU generator, in a fixed order: identical on every rank
    gen = torch.Generator().manual_seed(seed)
    d0, d1 = old_sizes["hidden_size"], sizes["hidden_size"]
    hidden = UnitMap.from_copies(d0, balanced_copies(d0, d1 - d0, gen))
    src, new = layer_sources(old_sizes["num_hidden_layers"], sizes["num_hidden_layers"], depth_placement, gen,
                             depth_sources)
    h0, h1 = old_sizes["num_attention_heads"], sizes["num_attention_heads"]
    f0, f1 = old_sizes["intermediate_size"], sizes["intermediate_size"]
    units = [LayerUnits(attn=UnitMap.from_copies(h0, balanced_copies(h0, h1 - h0, gen)).repeat_units(head),
                        ffn=UnitMap.from_copies(f0, balanced_copies(f0, f1 - f0, gen)))
             for _ in src]

    # build the grown model on the meta device: no init cost, no use of the global RNG
    cfg = _grown_config(model, arch, sizes)
    ref = next(model.parameters())
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        grown = type(model)(cfg)
    grown.to_empty(device=ref.device)
    grown.tie_weights()
    if tied != _is_tied(grown):
        raise ValueError("the grown model does not tie its output embedding like the input model")

    names = [n for n, _ in grown.named_parameters()]
    plans = _plan(spec, names, hidden, units, src, new)
    if depth_init == "identity":
        plans = apply_identity_init(arch, plans, spec.layer_prefix, new)

    old_params = dict(model.named_parameters())
    for name, p in grown.named_parameters():
        plan = plans[name]
        old = old_params.get(plan.source) if plan.source is not None else None
        if plan.source is not None and old is None:
            raise ValueError(f"{name}: source parameter {plan.source!r} not found in the input model")
        value = gather_value(plan, old, p.shape)
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{name}: planned shape {tuple(value.shape)} != model shape {tuple(p.shape)}")
        mask = noise_mask(plan, p.shape) if noise_std > 0 else None
        if mask is not None and bool(mask.any()):
            # drawn on the CPU generator so that the noise does not depend on the device
            noise = torch.randn(tuple(p.shape), generator=gen) * noise_std
            value = value + (noise * mask).to(value.device)
        p.data = value.to(dtype=(old if old is not None else ref).dtype, device=ref.device)
        p.requires_grad_(old.requires_grad if old is not None else True)
    old_buffers = dict(model.named_buffers())
    for name, b in grown.named_buffers():
        # position_ids / token_type_ids and the like do not depend on the grown sizes
        ob = old_buffers.get(_old_name(spec, name, src))
        if ob is None or ob.shape != b.shape:
            raise ValueError(f"cannot fill buffer {name!r} of the grown model")
        b.copy_(ob)
    grown.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        grown.generation_config = copy.deepcopy(model.generation_config)
    grown.train(model.training)
    if not return_mapping:
        return grown
    mapping = GrowthMapping(arch=arch, old_sizes=old_sizes, new_sizes=sizes, layer_sources=src,
                            new_layers=new, hidden=hidden, depth_init=depth_init, plans=plans)
    return grown, mapping
