"""Exact growth of Llama-family decoders: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``.

The three share one pre-norm block, ``h = x + o(Attn(q, k, v)(RMSNorm(x)))`` then
``y = h + down(silu(gate(n)) * up(n))`` with ``n = RMSNorm(h)``, grouped-query attention (query head
``i`` reads KV head ``i // (heads / kv_heads)``), rotary positions within each head, a final RMSNorm and
an output layer that may be tied to the input embedding. Qwen2 adds biases on q, k and v.

Everything a block adds to the residual stream goes through a *write* matrix (``o_proj``, ``down_proj``,
and the embedding that starts the stream); everything that reads the stream (``q``, ``k``, ``v``,
``gate``, ``up``, the output layer) sees it only through an RMSNorm. So the growth here copies nothing
("zero-write" construction) and is exact for any sizes:

* **new units** (FFN units, query heads, KV heads): their read rows are drawn from
  ``N(0, initializer_range^2)`` (biases 0) and their write columns are zero, so they add nothing now;
  the write columns still get a gradient (upstream gradient times the unit's non-zero activation);
* **heads at a fixed head size**: the old query heads that share a KV head stay together and keep
  reading it; when the query heads per KV head grow, old heads move (``o_proj`` columns with them) so
  that ``new_position // new_group = old_kv_head``, and new query heads fill the free places; rotary
  positions act within a head and do not change;
* **depth** (LLaMA Pro's block expansion): an inserted block copies its source block and sets
  ``o_proj`` and ``down_proj`` (and their biases) to zero, which makes it the identity;
* **hidden width ``d -> d'``, any factor**: the new residual dimensions start at zero and stay zero
  (new embedding columns and new rows of every write matrix zero). RMSNorm divides by
  ``sqrt(mean(x^2) + eps)`` over the whole vector, and ``mean`` over ``d'`` dimensions of ``[x, 0]`` is
  ``(d/d') mean(x^2)``; with ``eps' = eps d/d'`` the RMS becomes ``sqrt(d/d') rms(x)``, so every old gain
  is multiplied by ``sqrt(d/d')`` and each old output coordinate is unchanged; the new coordinates are
  0 whatever their gain (set to ``sqrt(d/d')``, a unit gain on the rescaled footing). Read matrices get
  random columns for the new dimensions (they read zeros now; the new dimensions need them to receive a
  gradient). A tied output layer gives ``h' E'^T = h E^T`` because the new columns of ``E'`` are zero;
  an untied one gets random new columns, which read the zero new coordinates of ``h'``.

``noise_std`` adds ``N(0, noise_std^2)`` to the entries that growth *copies* to a new place, i.e. the
read weights and RMSNorm gains of an inserted block, which start equal to their source's. Units added
afresh are random already, and write weights that must start at zero are never noised, so with
``depth_init="identity"`` the grown model stays exact at any ``noise_std``. With ``depth_init="copy"``
(ELLE; the inserted block is its source, not the identity) every entry of the inserted block is copied
and noised.

AdamW state (:func:`ray_lifelong.growth.remap_optimizer_state`): old entries keep their moments, moved
by the same plan as the weights; entries added afresh and every parameter of an identity block start at
zero. A gain rescaled by ``s = sqrt(d/d')`` acts through ``s g * n / s``, so its gradient is the old one
divided by ``s``: its first moment is divided by ``s`` and its second by ``s^2`` (the moments the grown
model would have accumulated on the same gradient history), not reset.

All random draws come from CPU generators seeded by ``seed`` (one for the layer choice, one per
parameter name), so every rank grows the same model and the global RNG is not used.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch
from torch import nn

from ray_lifelong.growth.depth import DEPTH_INITS, DEPTH_PLACEMENTS, layer_sources
from ray_lifelong.growth.plan import DimPlan, GrowthMapping, ParamPlan, UnitMap, gather_value, unit_mask

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
             "intermediate_size")
LAYER_PREFIX = "model.layers."

# Per parameter: one symbol per tensor dimension (nn.Linear weights are (out, in)) and how the entries the
# growth adds start. "d": residual dimensions, "q": query units (heads x head_dim), "kv": key/value units,
# "f": FFN units, None: not grown (vocabulary). "read": N(0, initializer_range^2); "zero": write weights
# and biases; "gain": RMSNorm gains (old entries rescaled, new ones sqrt(d/d')).
_LAYER_RULES: dict[str, tuple[tuple[str | None, ...], str]] = {
    "self_attn.q_proj.weight": (("q", "d"), "read"), "self_attn.q_proj.bias": (("q",), "zero"),
    "self_attn.k_proj.weight": (("kv", "d"), "read"), "self_attn.k_proj.bias": (("kv",), "zero"),
    "self_attn.v_proj.weight": (("kv", "d"), "read"), "self_attn.v_proj.bias": (("kv",), "zero"),
    "self_attn.o_proj.weight": (("d", "q"), "zero"), "self_attn.o_proj.bias": (("d",), "zero"),
    "mlp.gate_proj.weight": (("f", "d"), "read"), "mlp.gate_proj.bias": (("f",), "zero"),
    "mlp.up_proj.weight": (("f", "d"), "read"), "mlp.up_proj.bias": (("f",), "zero"),
    "mlp.down_proj.weight": (("d", "f"), "zero"), "mlp.down_proj.bias": (("d",), "zero"),
    "input_layernorm.weight": (("d",), "gain"), "post_attention_layernorm.weight": (("d",), "gain"),
}
_TOP_RULES: dict[str, tuple[tuple[str | None, ...], str]] = {
    "model.embed_tokens.weight": ((None, "d"), "zero"),
    "model.norm.weight": (("d",), "gain"),
    "lm_head.weight": ((None, "d"), "read"),
}
# what makes an inserted block the identity: everything it writes to the residual stream is zero
_IDENTITY_ZERO = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight",
                  "mlp.down_proj.bias")


def llama_arch(model: nn.Module) -> str | None:
    """``"llama"``, ``"mistral"`` or ``"qwen2"`` for the supported causal LMs, None for anything else."""
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    for cls in (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM):
        if isinstance(model, cls):
            return SUPPORTED[cls.__name__]
    return None


def head_size(config) -> int:
    """The attention head size: ``head_dim`` where the config sets it, else ``hidden / heads``."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def llama_sizes(model: nn.Module) -> dict[str, int]:
    """The five growable sizes of a Llama-family model (``num_key_value_heads`` None means MHA)."""
    c = model.config
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return {"num_hidden_layers": int(c.num_hidden_layers), "hidden_size": int(c.hidden_size),
            "num_attention_heads": int(c.num_attention_heads), "num_key_value_heads": int(kv),
            "intermediate_size": int(c.intermediate_size)}


def _resolve_sizes(old: dict[str, int], requested: dict[str, int | None], head_dim: int | None,
                   head: int) -> dict[str, int]:
    """Target sizes (None: unchanged); raises ValueError for anything that is not an exact growth."""
    for key, val in [*requested.items(), ("head_dim", head_dim)]:
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
            raise ValueError(f"{key} must be a positive int, got {val!r}")
    if head_dim is not None and head_dim != head:
        raise ValueError(f"head_dim {head} -> {head_dim}: growth keeps the head size fixed (rotary positions "
                         "and the attention scale depend on it); add heads instead")
    new = {k: requested[k] if requested[k] is not None else old[k] for k in SIZE_KEYS}
    shrunk = [f"{k} {old[k]} -> {new[k]}" for k in SIZE_KEYS if new[k] < old[k]]
    if shrunk:
        raise ValueError("growth cannot shrink a model: " + ", ".join(shrunk))
    h0, k0 = old["num_attention_heads"], old["num_key_value_heads"]
    h1, k1 = new["num_attention_heads"], new["num_key_value_heads"]
    if h1 % k1:
        raise ValueError(f"num_attention_heads {h1} is not a multiple of num_key_value_heads {k1}: the "
                         "query/KV grouping needs the same number of query heads per KV head")
    if h1 // k1 < h0 // k0:
        raise ValueError(f"{h1} query heads over {k1} KV heads is {h1 // k1} per KV head, fewer than the "
                         f"{h0 // k0} now: the query heads that share a KV head would be split, breaking the "
                         "query/KV grouping; add query heads or keep fewer KV heads")
    return new


def _prefix_map(n_old: int, n_new: int) -> UnitMap:
    """Old units kept in place, ``n_new - n_old`` units added afresh after them."""
    return UnitMap.placed(n_old, torch.cat([torch.arange(n_old), torch.full((n_new - n_old,), -1)]))


def _query_map(h0: int, k0: int, h1: int, k1: int, head: int) -> UnitMap:
    """Query units after growing ``h0/k0`` to ``h1/k1`` heads: old head ``i`` (KV head ``i // g0``) goes to
    ``(i // g0) * g1 + i % g0`` so that it still reads its KV head (which keeps its index); new heads fill
    the other places."""
    g0, g1 = h0 // k0, h1 // k1
    src = torch.full((h1,), -1)
    old = torch.arange(h0)
    src[(old // g0) * g1 + old % g0] = old
    units = torch.where(src[:, None] >= 0, src[:, None] * head + torch.arange(head), -1)
    return UnitMap.placed(h0 * head, units.reshape(-1))


def _grown_config(model: nn.Module, sizes: dict[str, int], head: int, src: Sequence[int]):
    cfg = copy.deepcopy(model.config)
    d0, d1 = model.config.hidden_size, sizes["hidden_size"]
    for k in SIZE_KEYS:
        setattr(cfg, k, sizes[k])
    # explicit, because hidden / heads need no longer equal the head size
    cfg.head_dim = head
    if d1 != d0:
        cfg.rms_norm_eps = model.config.rms_norm_eps * d0 / d1
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        # an inserted layer attends like its source (full or sliding window)
        cfg.layer_types = [types[s] for s in src]
    try:
        # what from_pretrained does with a saved config: a grown model that could not be reloaded is refused
        type(cfg).from_dict(cfg.to_dict())
    except Exception as e:
        cause = " ".join(str(e).split())
        raise ValueError(f"{type(model).__name__} cannot hold the grown sizes {sizes}: its config refuses "
                         f"them ({cause}), so the grown model could not be saved and reloaded") from e
    return cfg


def _plans(names: Sequence[str], maps: dict[str, UnitMap], src: Sequence[int], new: Sequence[bool],
           depth_init: str, gain_scale: float) -> tuple[dict[str, ParamPlan], dict[str, str]]:
    """One plan and one initialisation kind per grown parameter (module docstring)."""
    plans: dict[str, ParamPlan] = {}
    inits: dict[str, str] = {}
    for name in names:
        local, layer = name, None
        if name.startswith(LAYER_PREFIX):
            idx, local = name[len(LAYER_PREFIX):].split(".", 1)
            layer = int(idx)
            rule = _LAYER_RULES.get(local)
        else:
            rule = _TOP_RULES.get(name)
        if rule is None:
            raise ValueError(f"do not know how to grow parameter {name!r}")
        syms, init = rule
        dims = tuple(None if s is None or not maps[s].grows else DimPlan(maps[s], divide=False) for s in syms)
        plan = ParamPlan(source=name if layer is None else f"{LAYER_PREFIX}{src[layer]}.{local}", dims=dims,
                         scale=gain_scale if init == "gain" else 1.0)
        if layer is not None and new[layer]:
            plan = replace(plan, new_layer=True)
            if depth_init == "identity":
                # the identity block's gradient is zero at the growth point except for its write weights:
                # it starts with a fresh optimizer state
                plan = replace(plan, fresh_state=True, fill=0.0 if local in _IDENTITY_ZERO else None)
        plans[name] = plan
        inits[name] = init
    return plans, inits


def _param_seed(seed: int, name: str) -> int:
    # per parameter, so that a parameter's draws depend neither on the others nor on the fill order
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def _leading_block(t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The view of ``t`` restricted to the first ``sizes[d]`` entries of each leading dim ``d``."""
    for d, n in enumerate(sizes):
        t = t.narrow(d, 0, n)
    return t


def _value(name: str, plan: ParamPlan, init: str, old: torch.Tensor, shape: torch.Size, std: float,
           gain: float, noise_std: float, seed: int) -> torch.Tensor:
    """The grown parameter in float32: the plan's gathered (and rescaled) old entries, added entries
    initialised by ``init``, ELLE's noise on copied entries."""
    if plan.fill is not None:
        return gather_value(plan, old, shape)
    fresh_dims = any(d is not None and d.units.has_fresh for d in plan.dims)
    gen = torch.Generator().manual_seed(_param_seed(seed, name))
    if init == "read" and fresh_dims and all(d is None or d.units.is_appended for d in plan.dims):
        # The old entries form the leading block: copy it and draw exactly the added entries, region by
        # region, which is what gathering and then drawing into the added entries gives with fewer
        # passes (the draws are most of the cost of growing a large model).
        value = torch.empty(tuple(shape))
        src = old.detach()
        _leading_block(value, src.shape).copy_(src * plan.scale if plan.scale != 1.0 else src)
        for d in range(value.ndim):
            n_old, n_new = src.shape[d], value.shape[d]
            if n_new == n_old:
                continue
            region = _leading_block(value, src.shape[:d]).narrow(d, n_old, n_new - n_old)
            if region.is_contiguous():
                region.normal_(0.0, std, generator=gen)
            else:  # drawing into a strided view is several times slower than drawing and copying
                region.copy_(torch.empty(region.shape).normal_(0.0, std, generator=gen))
        fresh = None
    else:
        value = gather_value(plan, old, shape)
        fresh = unit_mask(plan, shape) if fresh_dims else None
        if fresh is not None and init == "read":
            value = torch.where(fresh, torch.empty(tuple(shape)).normal_(0.0, std, generator=gen), value)
        elif fresh is not None and init == "gain":
            value.masked_fill_(fresh, gain)
    if noise_std > 0 and plan.new_layer:
        # only entries copied from the source block: added ones are random already
        noise = torch.empty(tuple(shape)).normal_(0.0, noise_std, generator=gen)
        if fresh_dims:
            noise.masked_fill_(unit_mask(plan, shape) if fresh is None else fresh, 0.0)
        value += noise
    return value


@torch.no_grad()
def expand_llama(model: nn.Module, *, num_hidden_layers: int | None = None, hidden_size: int | None = None,
                 num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                 intermediate_size: int | None = None, head_dim: int | None = None,
                 depth_init: str = "identity", depth_placement: str = "interleave", noise_std: float = 0.0,
                 seed: int = 0, depth_sources: Sequence[int] | None = None, return_mapping: bool = False):
    """Grow a Llama-family causal LM exactly (module docstring); called by :func:`ray_lifelong.growth.expand`.

    Every size left None is unchanged; the sizes are independent (``hidden_size`` does not imply a head
    count: the head size is ``head_dim``, kept fixed). ``head_dim`` may only restate the current head
    size. The other arguments are those of :func:`ray_lifelong.growth.expand`.

    Returns:
        A new model of the same class, device, dtype and train/eval mode, whose config carries the new
        sizes, ``head_dim``, ``num_key_value_heads`` and ``rms_norm_eps`` (and the mapping when
        ``return_mapping``).

    Raises:
        ValueError: an unsupported model, shrinking, a head size change, a query/KV grouping that cannot
            be kept, an unknown ``depth_init`` / ``depth_placement``, or a negative ``noise_std``.
    """
    arch = llama_arch(model)
    if arch is None:
        raise ValueError(f"cannot grow a {type(model).__name__} here: supported are " + ", ".join(SUPPORTED))
    if depth_init not in DEPTH_INITS:
        raise ValueError(f"depth_init must be one of {DEPTH_INITS}, got {depth_init!r}")
    if depth_placement not in DEPTH_PLACEMENTS:
        raise ValueError(f"depth_placement must be one of {DEPTH_PLACEMENTS}, got {depth_placement!r}")
    if not noise_std >= 0.0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    old = llama_sizes(model)
    head = head_size(model.config)
    requested = dict(zip(SIZE_KEYS, (num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
                                     intermediate_size)))
    sizes = _resolve_sizes(old, requested, head_dim, head)

    gen = torch.Generator().manual_seed(seed)
    src, new = layer_sources(old["num_hidden_layers"], sizes["num_hidden_layers"], depth_placement, gen,
                             depth_sources)
    d0, d1 = old["hidden_size"], sizes["hidden_size"]
    k0, k1 = old["num_key_value_heads"], sizes["num_key_value_heads"]
    maps = {"d": _prefix_map(d0, d1), "kv": _prefix_map(k0 * head, k1 * head),
            "q": _query_map(old["num_attention_heads"], k0, sizes["num_attention_heads"], k1, head),
            "f": _prefix_map(old["intermediate_size"], sizes["intermediate_size"])}
    gain = (d0 / d1) ** 0.5

    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is model.get_input_embeddings().weight
    cfg = _grown_config(model, sizes, head, src)
    ref = next(model.parameters())
    # built on the meta device: no init cost, no use of the global RNG
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        grown = type(model)(cfg)
    grown.to_empty(device=ref.device)
    # tied: the output layer must share the grown embedding's tensor before any value is written
    grown.tie_weights()
    out_new = grown.get_output_embeddings()
    if tied != (out_new.weight is grown.get_input_embeddings().weight):
        raise ValueError("the grown model does not tie its output embedding like the input model")

    named = dict(grown.named_parameters())
    plans, inits = _plans(list(named), maps, src, new, depth_init, gain)
    old_params = dict(model.named_parameters())
    missing = sorted({p.source for p in plans.values()} - set(old_params))
    if missing:
        raise ValueError(f"source parameters not found in the input model: {missing}")
    std = float(getattr(model.config, "initializer_range", 0.02))

    def build(name: str) -> torch.Tensor:
        p, plan = named[name], plans[name]
        # built on the CPU, where the generators are, so that the values do not depend on the device
        old_cpu = old_params[plan.source].detach().cpu()
        v = _value(name, plan, inits[name], old_cpu, p.shape, std, gain, noise_std, seed)
        if tuple(v.shape) != tuple(p.shape):
            raise ValueError(f"{name}: planned shape {tuple(v.shape)} != model shape {tuple(p.shape)}")
        return v.to(dtype=old_params[plan.source].dtype, device=ref.device)

    # The random draws dominate the cost and one generator draws serially, so parameters are built
    # in parallel, each op single-threaded (a thread pool of parallel ops would oversubscribe the cores
    # with busy-waiting OpenMP teams); the caller's thread count is restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for name, value in zip(named, pool.map(build, named)):
                named[name].data = value
    finally:
        torch.set_num_threads(threads)
    for name, p in named.items():
        p.requires_grad_(old_params[plans[name].source].requires_grad)

    old_buffers = dict(model.named_buffers())
    for name, b in grown.named_buffers():
        # rotary frequencies depend on the head size only, which growth keeps
        ob = old_buffers.get(name)
        if ob is None or ob.shape != b.shape:
            raise ValueError(f"cannot fill buffer {name!r} of the grown model")
        b.copy_(ob)
    grown.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        grown.generation_config = copy.deepcopy(model.generation_config)
    grown.train(model.training)
    if not return_mapping:
        return grown
    mapping = GrowthMapping(arch=arch, old_sizes=old, new_sizes=sizes, layer_sources=src, new_layers=new,
                            hidden=maps["d"], depth_init=depth_init, plans=plans)
    return grown, mapping
