"""Measure how far a grown model is from the model it was grown from."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def logit_errors(reference: nn.Module, grown: nn.Module, *, batch_size: int = 2, seq_len: int = 16,
                 seed: int = 0) -> dict[str, float]:
    """Compare two LMs' logits on random token ids, in float32, dropout off.

    Both models are run in eval mode and put back in their previous mode; the global RNG is not used.

    Args:
        reference: the model before growth.
        grown: the model after growth (same vocabulary).
        batch_size: rows of the random batch.
        seq_len: tokens per row (clipped to the position table).
        seed: seeds the random token ids.

    Returns:
        ``max_abs``: ``max |logits_grown - logits_reference|`` over the ``(batch_size, seq_len, vocab)``
        logits (the exactness measure of the growth issue); ``ref_std``: the std of the reference
        logits, to read ``max_abs`` against; ``kl``: mean ``KL(p_reference || p_grown)`` per token (nats).
    """
    cfg = reference.config
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", seq_len)
    seq_len = min(seq_len, positions)
    ids = torch.randint(cfg.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    out = []
    for m in (reference, grown):
        was_training = m.training
        m.eval()
        try:
            dev = next(m.parameters()).device
            out.append(m(input_ids=ids.to(dev)).logits.float().cpu())
        finally:
            m.train(was_training)
    ref, new = out
    kl = F.kl_div(F.log_softmax(new, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    return {"max_abs": float((new - ref).abs().max()), "ref_std": float(ref.std()), "kl": float(kl.mean())}


def max_logit_error(reference: nn.Module, grown: nn.Module, *, batch_size: int = 2, seq_len: int = 16,
                    seed: int = 0) -> float:
    """``max |logits_grown - logits_reference|`` on random ids, float32, dropout off.

    See :func:`logit_errors` for the arguments.
    """
    return logit_errors(reference, grown, batch_size=batch_size, seq_len=seq_len, seed=seed)["max_abs"]
