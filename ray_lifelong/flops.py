"""Training compute, counted one way everywhere (Kaplan et al. 2020; docs/design.md, "Compute").

Per token of a length-S sequence: forward = 2 N + 2 L S d, with N = L (4 d^2 + 2 d d_ff) plus the
output projection d V at the positions where logits are computed. Training = 3 x forward.
"""

from __future__ import annotations

from ray_lifelong.config.plan import stage_plans


def non_embedding_params(num_layers: int, hidden: int, ffn: int) -> int:
    return num_layers * (4 * hidden * hidden + 2 * hidden * ffn)


def forward_flops_per_sequence(*, num_layers: int, hidden: int, ffn: int, vocab: int, seq_len: int,
                               logit_positions: float) -> float:
    """Forward FLOPs of one sequence; ``logit_positions`` = positions that get vocabulary logits."""
    body = seq_len * (2 * non_embedding_params(num_layers, hidden, ffn) + 2 * num_layers * seq_len * hidden)
    head = 2 * hidden * vocab * logit_positions
    return float(body + head)


def flops_sizes(sizes) -> dict[str, int]:
    """``num_layers``, ``hidden``, ``ffn`` of any way this project spells a model's sizes: a ``ModelConfig``
    or a stage plan's sizes (``num_layers``, ``hidden_size``, ``intermediate_size``), ``growth.model_sizes``
    (``num_hidden_layers``, ...), or a saved HF ``config.json`` (BERT's names, or GPT-2's ``n_layer``,
    ``n_embd``, ``n_inner``, whose ``None`` means ``4 * n_embd``)."""
    get = sizes.get if isinstance(sizes, dict) else lambda k, d=None: getattr(sizes, k, d)
    if get("n_layer") is not None:
        hidden = get("n_embd")
        return {"num_layers": get("n_layer"), "hidden": hidden, "ffn": get("n_inner") or 4 * hidden}
    layers = get("num_hidden_layers") if get("num_hidden_layers") is not None else get("num_layers")
    return {"num_layers": layers, "hidden": get("hidden_size"), "ffn": get("intermediate_size")}


def sequence_flops(sizes, *, vocab: int, seq_len: int, arch: str, mlm_probability: float,
                   train: bool = True) -> float:
    """FLOPs of one sequence through a model of ``sizes`` (any form :func:`flops_sizes` reads): training
    (3 x forward) or, for a frozen teacher, its forward alone."""
    fwd = forward_flops_per_sequence(**flops_sizes(sizes), vocab=vocab, seq_len=seq_len,
                                     logit_positions=logit_positions(arch, seq_len, mlm_probability))
    return 3.0 * fwd if train else fwd


def logit_positions(arch: str, seq_len: int, mlm_probability: float) -> float:
    """MLM computes logits only at the masked positions (our LMObjective); causal LM at S-1 positions."""
    return mlm_probability * seq_len if arch == "bert" else float(seq_len - 1)


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
