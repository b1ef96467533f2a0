"""Training compute, counted one way everywhere (Kaplan et al. 2020; docs/design.md, "Compute").

Per token of a length-S sequence: forward = 2 N + 2 L S d, with N the non-embedding matrix parameters plus
the output projection d V at the positions where logits are computed. Training = 3 x forward. N per layer:
BERT and GPT-2 4 d^2 + 2 d d_ff; Llama Q and O d x d, K and V d x (kv_heads x head_dim) each, and SwiGLU's
three d x d_ff matrices (gate, up, down).
"""

from __future__ import annotations

from ray_lifelong.config.plan import stage_plans
from ray_lifelong.models.arch import arch_of_model_type, is_causal


def non_embedding_params(num_layers: int, hidden: int, ffn: int, *, kv_hidden: int | None = None,
                         ffn_mats: int = 2) -> int:
    """Matrix parameters of the layers: per layer Q and O (d x d), K and V (d x ``kv_hidden`` each;
    ``None``: d, one KV head per query head) and ``ffn_mats`` FFN matrices d x d_ff (2: in and out; 3:
    SwiGLU's gate, up and down)."""
    kv = hidden if kv_hidden is None else kv_hidden
    return num_layers * (2 * hidden * hidden + 2 * hidden * kv + ffn_mats * hidden * ffn)


def forward_flops_per_sequence(*, num_layers: int, hidden: int, ffn: int, vocab: int, seq_len: int,
                               logit_positions: float, kv_hidden: int | None = None,
                               ffn_mats: int = 2) -> float:
    """Forward FLOPs of one sequence; ``logit_positions`` = positions that get vocabulary logits;
    ``kv_hidden``, ``ffn_mats``: as :func:`non_embedding_params` (Llama's shape)."""
    n = non_embedding_params(num_layers, hidden, ffn, kv_hidden=kv_hidden, ffn_mats=ffn_mats)
    # the attention scores and their weighted sum run over every query head, d wide in all three archs
    body = seq_len * (2 * n + 2 * num_layers * seq_len * hidden)
    head = 2 * hidden * vocab * logit_positions
    return float(body + head)


def flops_sizes(sizes, arch: str | None = None) -> dict[str, int]:
    """``num_layers``, ``hidden``, ``ffn`` of any way this project spells a model's sizes: a ``ModelConfig``
    or a stage plan's sizes (``num_layers``, ``hidden_size``, ``intermediate_size``), ``growth.model_sizes``
    (``num_hidden_layers``, ...), or a saved HF ``config.json`` (BERT's names, or GPT-2's ``n_layer``,
    ``n_embd``, ``n_inner``, whose ``None`` means ``4 * n_embd``).

    A Llama-family model adds ``kv_hidden`` (KV heads x head size) and ``ffn_mats`` 3 (SwiGLU). It is
    recognised by its own spelling (a ``ModelConfig`` of ``arch: llama``, a ``model_type`` of the llama
    family, or a KV head count: ``num_kv_heads`` in a plan's sizes, ``num_key_value_heads`` in
    ``growth.model_sizes`` and ``config.json``), else by ``arch``."""
    get = sizes.get if isinstance(sizes, dict) else lambda k, d=None: getattr(sizes, k, d)
    if get("n_layer") is not None:
        hidden = get("n_embd")
        return {"num_layers": get("n_layer"), "hidden": hidden, "ffn": get("n_inner") or 4 * hidden}
    layers = get("num_hidden_layers") if get("num_hidden_layers") is not None else get("num_layers")
    out = {"num_layers": layers, "hidden": get("hidden_size"), "ffn": get("intermediate_size")}
    own = get("arch") or arch_of_model_type(get("model_type"))
    kv = get("num_kv_heads") if get("num_kv_heads") is not None else get("num_key_value_heads")
    if own == "llama" or (own is None and (kv is not None or arch == "llama")):
        heads = get("num_attention_heads") if get("num_attention_heads") is not None else get("num_heads")
        head = get("head_dim") or out["hidden"] // heads
        out.update(kv_hidden=(kv or heads) * head, ffn_mats=3)
    return out


def sequence_flops(sizes, *, vocab: int, seq_len: int, arch: str, mlm_probability: float,
                   train: bool = True) -> float:
    """FLOPs of one sequence through a model of ``sizes`` (any form :func:`flops_sizes` reads): training
    (3 x forward) or, for a frozen teacher, its forward alone."""
    fwd = forward_flops_per_sequence(**flops_sizes(sizes, arch), vocab=vocab, seq_len=seq_len,
                                     logit_positions=logit_positions(arch, seq_len, mlm_probability))
    return 3.0 * fwd if train else fwd


def logit_positions(arch: str, seq_len: int, mlm_probability: float) -> float:
    """MLM computes logits only at the masked positions (our LMObjective); causal LM at S-1 positions."""
    return float(seq_len - 1) if is_causal(arch) else mlm_probability * seq_len


def planned_stages(cfg, vocab_rows: int) -> list[dict]:
    """Steps and training FLOPs of every stage of a run config, known before it runs.

    Each domain's steps at the size it trains at, plus the function-recovering warmup before it (the run's
    :func:`~ray_lifelong.config.plan.stage_plans`). This is the ``stage_flops`` a run
    reports, teacher FLOPs (KI, logit KD) excepted, so other runs can be matched to a run's budget ahead of it
    (bench/elle_stream.py ``--match planned``). ``vocab_rows``: the model's output rows (the tokenizer's size
    padded to ``model.vocab_multiple``).
    """
    stages = []
    for plan in stage_plans(cfg):
        size, steps = plan.sizes, plan.steps + plan.frw_steps
        per_seq = sequence_flops(size, vocab=vocab_rows, seq_len=cfg.data.seq_len, arch=cfg.model.arch,
                                 mlm_probability=cfg.data.mlm_probability)
        stages.append({"steps": steps, "flops": steps * plan.batch_size * per_seq,
                       "sizes": (size["num_layers"], size["hidden_size"], size["intermediate_size"])})
    return stages
