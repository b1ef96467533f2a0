"""Teachers for Knowledge Inheritance: find, check and load a frozen teacher model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ray_lifelong.data.tokenizer import load_tokenizer
from ray_lifelong.models.arch import arch_of_model_type
from ray_lifelong.models.build import LMObjective, load_model, position_rows


def check_teacher_compatible(teacher_dir: str, tokenizer, arch: str, rows: int) -> dict:
    """Refuse a teacher whose vocabulary or tokenizer differs from the student's; return its config.
    ``rows``: the student's vocabulary rows (:func:`ray_lifelong.models.init_from.student_rows`).

    Raises:
        ValueError: naming the teacher directory and what differs.
    """
    cfg = json.loads((Path(teacher_dir) / "config.json").read_text())
    # by family: a Mistral or Qwen2 teacher computes logits like a Llama student (LMObjective)
    if arch_of_model_type(cfg.get("model_type")) != arch:
        raise ValueError(f"teacher {teacher_dir}: model type {cfg.get('model_type')!r} does not match the "
                         f"student's architecture {arch!r}")

    if cfg.get("vocab_size") != rows:  # the KL needs logits of the same width
        raise ValueError(f"teacher {teacher_dir}: vocabulary of {cfg.get('vocab_size')} rows, the student's "
                         f"tokenizer has {len(tokenizer)} tokens ({rows} rows): KI needs the same tokenizer")
    if (Path(teacher_dir) / "tokenizer.json").is_file():
        if load_tokenizer(teacher_dir).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"teacher {teacher_dir}: its tokenizer maps tokens to different ids than the "
                             f"student's: KI needs the same tokenizer")
    return cfg


def load_teacher(teacher_dir: str, device: torch.device, bf16: bool):
    """A frozen teacher: eval mode, no gradients, no optimizer, never DDP-wrapped; bf16 on GPU."""
    return frozen(load_model(teacher_dir), device, bf16)


def frozen(model, device: torch.device, bf16: bool):
    """``model`` as a teacher: eval mode, no gradients, on ``device``; bf16 on GPU."""
    dtype = torch.bfloat16 if (bf16 and device.type == "cuda") else torch.float32
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


@torch.no_grad()
def teacher_logits(teachers: dict[int, torch.nn.Module], inputs: torch.Tensor, labels: torch.Tensor,
                   domain_ids: torch.Tensor, student_count: int) -> torch.Tensor:
    """Teacher logits at the student's supervised positions, each row from its own domain's teacher.

    Args:
        teachers: ``{domain_id: model}``; key ``-1`` is the teacher for every domain without its own.
        inputs, labels: ``(B, T)`` — exactly the student's (masked) batch.
        domain_ids: ``(B,)`` domain of each row.
        student_count: M, the number of supervised positions of the student's output.

    Returns:
        ``(M, V)`` logits in the student's row-major position order.
    """
    groups = {}
    for d in domain_ids.unique().tolist():
        t = teachers.get(int(d), teachers.get(-1))
        if t is None:
            raise ValueError(f"no teacher for domain id {d} (and no default teacher)")
        groups.setdefault(id(t), (t, []))[1].append(int(d))
    if len(groups) == 1:
        model = next(iter(groups.values()))[0]
        return LMObjective(model)(inputs, labels)[0].float()
    # rows of several domains: run each teacher on its rows, then put the positions back in order
    row_of_pos = position_rows(labels, LMObjective(next(iter(groups.values()))[0]).arch)
    out = None
    for model, doms in groups.values():
        rows = torch.isin(domain_ids, torch.tensor(doms, device=domain_ids.device))
        logits = LMObjective(model)(inputs[rows], labels[rows])[0].float()
        if out is None:
            out = logits.new_empty((student_count, logits.shape[-1]))
        out[rows[row_of_pos]] = logits
    return out
