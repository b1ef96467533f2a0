"""Pure functions that turn token ids into training rows (no Ray, no I/O, no torch: the data pipeline's
actors import this module).

:func:`pack` concatenates documents (each followed by a separator, and preceded by a BOS where the
tokenizer starts its texts with one) into fixed-length rows, with an optional prefix per row (BERT's
``[CLS]``, an ELLE domain prompt) and suffix (BERT's ``[SEP]``). The masked LMs' labels are made from the
rows by :mod:`ray_lifelong.data.masking`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
