"""Training compute, counted one way everywhere (Kaplan et al. 2020; shared/specs/flops.md).

Per token of a length-S sequence: forward = 2 N + 2 L S d, with N = L (4 d^2 + 2 d d_ff) plus the
output projection d V at the positions where logits are computed. Training = 3 x forward.
"""

from __future__ import annotations

from ray_lifelong.config.load import frw_steps_before, stage_model_sizes


def non_embedding_params(num_layers: int, hidden: int, ffn: int) -> int:
    return num_layers * (4 * hidden * hidden + 2 * hidden * ffn)


def forward_flops_per_sequence(*, num_layers: int, hidden: int, ffn: int, vocab: int, seq_len: int,
                               logit_positions: float) -> float:
    """Forward FLOPs of one sequence; ``logit_positions`` = positions that get vocabulary logits."""
    body = seq_len * (2 * non_embedding_params(num_layers, hidden, ffn) + 2 * num_layers * seq_len * hidden)
    head = 2 * hidden * vocab * logit_positions
    return float(body + head)


def train_flops_per_sequence(**kwargs) -> float:
    return 3.0 * forward_flops_per_sequence(**kwargs)


def logit_positions(arch: str, seq_len: int, mlm_probability: float) -> float:
    """MLM computes logits only at the masked positions (our LMObjective); causal LM at S-1 positions."""
    return mlm_probability * seq_len if arch == "bert" else float(seq_len - 1)


def planned_stages(cfg, vocab_rows: int) -> list[dict]:
    """Steps and training FLOPs of every stage of a run config, known before it runs.

    Each domain's steps at the size it trains at (``config.stage_model_sizes``), plus the function-recovering
    warmup before it (``config.frw_steps_before``, the pipeline's own rule). This is the ``stage_flops`` a run
    reports, teacher FLOPs (KI, logit KD) excepted, so other runs can be matched to a run's budget ahead of it
    (bench/elle_stream.py ``--match planned``). ``vocab_rows``: the model's output rows (the tokenizer's size
    padded to ``model.vocab_multiple``).
    """
    seq = cfg.data.seq_len
    positions = logit_positions(cfg.model.arch, seq, cfg.data.mlm_probability)
    stages = []
    for i, (dom, size) in enumerate(zip(cfg.data.domains, stage_model_sizes(cfg))):
        steps = (dom.steps or cfg.train.steps) + frw_steps_before(cfg, i)
        per_seq = train_flops_per_sequence(num_layers=size["num_layers"], hidden=size["hidden_size"],
                                           ffn=size["intermediate_size"], vocab=vocab_rows, seq_len=seq,
                                           logit_positions=positions)
        batch = dom.batch_size or cfg.train.batch_size
        stages.append({"steps": steps, "flops": steps * batch * per_seq,
                       "sizes": (size["num_layers"], size["hidden_size"], size["intermediate_size"])})
    return stages
