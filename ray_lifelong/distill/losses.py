"""The Knowledge Inheritance loss (Qin et al., NAACL 2022, Eq. 1-2).

Per supervised position: (1 - alpha) * CE(student, label) + alpha * T^2 * KL(p_teacher^T || p_student^T),
averaged over the positions whose label is not ``ignore_index`` (the masked positions for MLM, every next
token for causal LM). Pure torch: no Ray, no transformers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F


class KILoss(NamedTuple):
    total: torch.Tensor
    """The loss to back-propagate (scalar)."""
    ce: torch.Tensor
    """Mean cross-entropy part, before the (1 - alpha) weight (detached for logging)."""
    kl: torch.Tensor
    """Mean T^2 * KL part, before the alpha weight (detached for logging)."""


def ki_loss_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
                  alpha: float, temperature: float = 2.0, ignore_index: int = -100,
                  top_k: int | None = None) -> KILoss:
    """KI loss with its parts; see :func:`ki_loss` for the arguments."""
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(f"teacher vocabulary ({teacher_logits.shape[-1]}) differs from the student's "
                             f"({student_logits.shape[-1]}): KI needs a shared vocabulary")
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must cover the same positions")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match the logits' leading dims "
                         f"{tuple(student_logits.shape[:-1])}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    keep = labels != ignore_index
    s = student_logits[keep].float()  # (M, V): softmaxes in float32 whatever the autocast dtype
    ce = F.cross_entropy(s, labels[keep], reduction="mean") if s.numel() else s.sum()
    if alpha == 0.0 or teacher_logits is None:
        if alpha > 0:
            raise ValueError("alpha > 0 needs teacher logits")
        zero = ce.detach() * 0
        return KILoss(ce, ce.detach(), zero)
    t = teacher_logits[keep].detach().float()  # gradients never reach the teacher
    log_ps = F.log_softmax(s / temperature, dim=-1)
    if top_k is not None and top_k < t.shape[-1]:
        # keep the teacher's top-k probabilities, renormalised (ki.md section 10: k=10 nearly lossless)
        t_top, idx = (t / temperature).topk(top_k, dim=-1)
        log_pt = F.log_softmax(t_top, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps.gather(-1, idx))).sum(-1)
    else:
        log_pt = F.log_softmax(t / temperature, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    kl = temperature**2 * kl.mean() if kl.numel() else s.sum()
    total = (1.0 - alpha) * ce + alpha * kl
    return KILoss(total, ce.detach(), kl.detach())


def ki_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float = 2.0,
    ignore_index: int = -100,
    top_k: int | None = None,
) -> torch.Tensor:
    """(1 - alpha) * CE + alpha * T^2 * KL(teacher || student), averaged over supervised positions.

    Args:
        student_logits: ``(..., V)`` student logits (any leading dims, e.g. ``(B, T, V)`` or ``(M, V)``).
        teacher_logits: ``(..., V)`` teacher logits at the same positions (no gradient flows to them);
            may be ``None`` when ``alpha == 0``.
        labels: ``(...)`` target ids, ``ignore_index`` where a position is not supervised.
        alpha: the inheritance rate in [0, 1] (see :func:`inheritance_rate`).
        temperature: softmax temperature T of the KL part (the paper's default 2).
        top_k: keep only the teacher's top-k probabilities, renormalised (teacher outputs can be cached).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: vocabulary sizes or positions differ between teacher and student.
    """
    return ki_loss_parts(
        student_logits,
        teacher_logits,
        labels,
        alpha=alpha,
        temperature=temperature,
        ignore_index=ignore_index,
        top_k=top_k,
    ).total
