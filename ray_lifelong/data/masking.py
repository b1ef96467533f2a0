"""BERT's dynamic masking of packed rows (the masked LMs' labels): of the selected positions (``prob``) 80%
become ``[MASK]``, 10% a random token and 10% stay, and only those positions carry a label. Pure torch.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from ray_lifelong.data.packing import IGNORE_INDEX


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

