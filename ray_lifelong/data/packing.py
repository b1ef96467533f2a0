"""Pure functions that turn token ids into training sequences and batches (no Ray, no I/O).

- :func:`pack` concatenates documents (each followed by a separator, and preceded by a BOS where the
  tokenizer starts its texts with one) into fixed-length rows, with an optional prefix per row (BERT's
  ``[CLS]``, an ELLE domain prompt) and suffix (BERT's ``[SEP]``).
- :func:`mlm_mask` applies BERT's dynamic masking: of the selected positions (``prob``) 80% become
  ``[MASK]``, 10% a random token and 10% stay, and only those positions carry a label.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PackSpec:
    """How rows are laid out: ``prefix + body + suffix`` with ``len == seq_len``."""

    seq_len: int
    separator: int
    """Appended after every document (``[SEP]`` for BERT, ``</s>`` for RoBERTa, the EOS for the causal LMs:
    ``<|endoftext|>`` for GPT-2, ``</s>`` for Llama)."""
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    doc_prefix: tuple[int, ...] = ()
    """Put before every document: the BOS of a tokenizer that starts its texts with one (Llama's ``<s>``)."""

    @property
    def body_len(self) -> int:
        return self.seq_len - len(self.prefix) - len(self.suffix)


def pack(
    docs: Sequence[Sequence[int]], spec: PackSpec, carry: Sequence[int] = ()
) -> tuple[np.ndarray, list[int]]:
    """Pack token lists into rows of ``spec.seq_len``.

    Args:
        docs: token ids of each document, without special tokens.
        spec: row layout.
        carry: tokens left over from the previous call (the stream continues across batches).

    Returns:
        ``(rows, carry)``: an ``int32`` array of shape ``(n, seq_len)`` and the tokens that did not fill
        a whole row, to pass to the next call. No token is lost or duplicated.
    """
    if spec.body_len <= 0:
        raise ValueError(f"seq_len {spec.seq_len} leaves no room after prefix/suffix")
    stream = list(carry)
    for doc in docs:
        stream.extend(spec.doc_prefix)
        stream.extend(doc)
        stream.append(spec.separator)
    n = len(stream) // spec.body_len
    body = np.asarray(stream[: n * spec.body_len], dtype=np.int32).reshape(n, spec.body_len)
    parts = []
    if spec.prefix:
        parts.append(np.broadcast_to(np.asarray(spec.prefix, dtype=np.int32), (n, len(spec.prefix))))
    parts.append(body)
    if spec.suffix:
        parts.append(np.broadcast_to(np.asarray(spec.suffix, dtype=np.int32), (n, len(spec.suffix))))
    rows = np.concatenate(parts, axis=1) if len(parts) > 1 else body
    return np.ascontiguousarray(rows), stream[n * spec.body_len :]


def mlm_mask(
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a ``(B, T)`` batch; returns ``(inputs, labels)`` with labels -100 where unmasked.

    Special tokens (``special_ids``: [CLS], [SEP], [PAD], prompts) are never selected. At least one
    position per row is selected so every row contributes to the loss.
    """
    ids = input_ids.clone()
    device = ids.device
    can_mask = ~torch.isin(ids, torch.as_tensor(list(special_ids), device=device, dtype=ids.dtype))
    u = torch.rand(ids.shape, generator=generator, device="cpu").to(device)
    selected = (u < prob) & can_mask
    # guarantee one label per row: choose the maskable position with the smallest draw
    empty = ~selected.any(dim=1) & can_mask.any(dim=1)
    if empty.any():
        first = torch.where(can_mask, u, torch.full_like(u, 2.0)).argmin(dim=1)
        selected[empty, first[empty]] = True
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    action = torch.rand(ids.shape, generator=generator, device="cpu").to(device)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device="cpu").to(device)
    ids[to_mask] = mask_id
    ids[to_random] = random_ids[to_random].to(ids.dtype)
    return ids, labels


def mlm_mask_fixed(input_ids: torch.Tensor, *, seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Masking that depends only on each row's content and ``seed``, not on batch order or sharding.

    Used for validation, so a perplexity is comparable between stages, workers and restarts.
    """
    inputs, labels = [], []
    for row in input_ids:
        key = zlib.crc32(row.cpu().numpy().astype(np.int64).tobytes())
        gen = torch.Generator().manual_seed((seed * 1_000_003 + key) % (2**63))
        x, y = mlm_mask(row[None], generator=gen, **kwargs)
        inputs.append(x)
        labels.append(y)
    return torch.cat(inputs), torch.cat(labels)

