"""The parts of a training step that need no Ray: the optimizer and the batch masking.

Kept apart from ``loop.py`` (which runs inside Ray Train workers) so that benchmarks, GPU checks and
tests build exactly the stage's optimizer and masking without importing Ray.
"""

from __future__ import annotations

import torch

from ray_lifelong.data.masking import mlm_mask, mlm_mask_fixed
from ray_lifelong.data.tokenizer import special_token_ids
from ray_lifelong.distill.losses import KILoss, ki_loss, ki_loss_parts
from ray_lifelong.models.arch import is_causal
from ray_lifelong.models.build import lm_loss

# validation masks depend on this seed and each row's content only, so perplexities compare across stages
EVAL_MASK_SEED = 1234


def build_optimizer(model, lr: float, t) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norm gains (BERT's and GPT-2's LayerNorm, Llama's RMSNorm:
    every 1-D parameter), as is standard."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or ".ln_" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused CUDA kernel updates every tensor in one launch (the for-each path launches several per group)
    fused = bool(decay + no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=fused)


class Masker:
    """Turns packed ``input_ids`` into (inputs, labels): MLM masking for BERT, identity for the causal LMs."""

    def __init__(self, tokenizer, prob: float, arch: str) -> None:
        self.arch = arch
        self.kw = dict(mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                       special_ids=special_token_ids(tokenizer), prob=prob)

    def __call__(self, ids: torch.Tensor, gen: torch.Generator | None, fixed: bool = False):
        if is_causal(self.arch):
            return ids, ids
        if fixed:
            return mlm_mask_fixed(ids, seed=EVAL_MASK_SEED, **self.kw)
        return mlm_mask(ids, generator=gen, **self.kw)


class maybe_no_sync:
    """DDP ``no_sync`` on accumulation micro-steps (gradients are all-reduced once per optimizer step)."""

    def __init__(self, module, sync: bool) -> None:
        self.ctx = module.no_sync() if (not sync and hasattr(module, "no_sync")) else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


def stage_loss(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.0,
               teacher_logits: torch.Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
               previous_logits: torch.Tensor | None = None, previous_rows: torch.Tensor | None = None,
               kd_weight: float = 0.0, kd_temperature: float = 1.0) -> KILoss:
    """The loss of one micro-batch of a stage, with its parts detached for logging.

    While ``alpha > 0``, Knowledge Inheritance: ``(1 - alpha) CE + alpha T^2 KL(teacher || student)``. Else,
    with ``previous_logits`` (the logit-KD baseline), ``CE + kd_weight T^2 KL(previous || student)`` over the
    supervised positions ``previous_rows`` (the replayed rows'). Else the cross-entropy alone.
    """
    if alpha > 0:
        return ki_loss_parts(logits, teacher_logits, targets, alpha=alpha, temperature=temperature,
                             top_k=top_k)
    ce = lm_loss(logits, targets)
    if previous_logits is None:
        return KILoss(ce, ce.detach(), 0.0)
    # alpha=1: the KI loss is exactly T^2 * KL(previous || student), with its gradient
    kl = ki_loss(logits[previous_rows], previous_logits, targets[previous_rows], alpha=1.0,
                 temperature=kd_temperature)
    return KILoss(ce + kd_weight * kl, ce.detach(), kl.detach())
