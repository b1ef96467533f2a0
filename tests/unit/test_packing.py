import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_lifelong.data.masking import mlm_mask, mlm_mask_fixed
from ray_lifelong.data.packing import IGNORE_INDEX, PackSpec, pack

docs_strategy = st.lists(st.lists(st.integers(10, 99), min_size=0, max_size=40), min_size=0, max_size=12)


@settings(max_examples=60, deadline=None)
@given(docs=docs_strategy, seq_len=st.integers(4, 24), split=st.integers(0, 12))
def test_pack_loses_and_duplicates_nothing_across_calls(docs, seq_len, split):
    spec = PackSpec(seq_len, separator=1, prefix=(2,), suffix=(3,))
    rows_a, carry = pack(docs[:split], spec)
    rows_b, carry = pack(docs[split:], spec, carry)
    rows = np.concatenate([rows_a, rows_b]) if len(rows_a) or len(rows_b) else np.zeros((0, seq_len))
    assert rows.shape[1:] == (seq_len,)
    assert (rows[:, 0] == 2).all() and (rows[:, -1] == 3).all()
    body = list(rows[:, 1:-1].reshape(-1)) + list(carry)
    expected = [t for d in docs for t in (*d, 1)]
    assert body == expected
    assert len(carry) < spec.body_len


def test_pack_without_prefix_is_a_plain_reshape():
    rows, carry = pack([[5, 6, 7], [8]], PackSpec(3, separator=0))
    assert rows.tolist() == [[5, 6, 7], [0, 8, 0]] and carry == []
    assert rows.dtype == np.int32


def test_pack_rejects_no_room():
    import pytest

    with pytest.raises(ValueError, match="no room"):
        pack([[1]], PackSpec(2, 0, (1,), (2,)))


SPECIALS = [0, 1, 2, 3, 4]


def _batch(n=64, t=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (n, t), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return ids


def test_mlm_mask_labels_only_selected_and_specials_untouched():
    ids = _batch()
    inputs, labels = mlm_mask(ids, mask_id=4, vocab_size=500, special_ids=SPECIALS, prob=0.15,
                              generator=torch.Generator().manual_seed(1))
    sel = labels != IGNORE_INDEX
    assert (labels[sel] == ids[sel]).all()
    assert (inputs[~sel] == ids[~sel]).all()  # unselected positions are never changed
    assert not sel[:, 0].any() and not sel[:, -1].any()
    rate = sel.float().mean().item()
    assert 0.11 < rate < 0.19
    masked = (inputs == 4) & sel
    kept = (inputs == ids) & sel
    assert 0.72 < masked.sum() / sel.sum() < 0.88
    assert 0.04 < kept.sum() / sel.sum() < 0.2  # 10% kept + random tokens that equal the original


def test_mlm_mask_every_row_has_a_label():
    ids = _batch(n=200, t=8)
    _, labels = mlm_mask(ids, mask_id=4, vocab_size=500, special_ids=SPECIALS, prob=0.01,
                         generator=torch.Generator().manual_seed(0))
    assert ((labels != IGNORE_INDEX).sum(1) >= 1).all()


def test_fixed_mask_depends_on_row_content_not_batch():
    ids = _batch(n=6)
    kw = dict(mask_id=4, vocab_size=500, special_ids=SPECIALS, prob=0.15)
    a_in, a_lab = mlm_mask_fixed(ids, seed=3, **kw)
    b_in, b_lab = mlm_mask_fixed(ids.flip(0), seed=3, **kw)
    assert torch.equal(a_in, b_in.flip(0)) and torch.equal(a_lab, b_lab.flip(0))
    c_in, _ = mlm_mask_fixed(ids, seed=4, **kw)
    assert not torch.equal(a_in, c_in)


def test_validation_rows_keep_every_scored_row_and_batch_as_the_stream():
    """An evaluation scores each domain's first ``cap`` rows in stream order; the rows kept end at the last
    of those, and their batches are consecutive slices of the stream."""
    from ray_lifelong.data.stream import scored_rows

    dom = np.array([0, 0, 0, 1, 0, 1, 1, 1, 2, 2, 1], np.int32)
    ids = np.arange(len(dom) * 2, dtype=np.int32).reshape(-1, 2)
    kept = scored_rows(ids, dom, 3, cap=2)
    assert len(kept.domain_id) == 10  # domain 2's second row is the last one scored
    kept = scored_rows(ids, dom, 3, cap=1)
    assert len(kept.domain_id) == 9
    batches = list(scored_rows(ids, dom, 3, cap=99).batches(4))
    assert [len(b["domain_id"]) for b in batches] == [4, 4, 3]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), torch.from_numpy(ids).long())
