"""Training compute, counted one way everywhere (Kaplan et al. 2020; shared/specs/flops.md).

Per token of a length-S sequence: forward = 2 N + 2 L S d, with N = L (4 d^2 + 2 d d_ff) plus the
output projection d V at the positions where logits are computed. Training = 3 x forward.
"""

from __future__ import annotations


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
