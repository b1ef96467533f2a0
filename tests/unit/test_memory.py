"""The replay mixing rules (pure): how many rows are replaced and which memory rows replace them."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_lifelong.data.memory import replay_count, replay_draw


@given(rows=st.integers(1, 64), ratio=st.floats(0.0, 0.99), seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_replay_count_is_a_rounding_of_ratio_times_rows(rows, ratio, seed):
    k = replay_count(rows, ratio, torch.Generator().manual_seed(seed))
    assert int(ratio * rows) <= k <= min(rows, int(ratio * rows) + 1)


@pytest.mark.parametrize("rows, ratio", [(16, 0.1), (8, 0.1), (4, 0.05), (32, 0.25)])
def test_replay_count_is_unbiased(rows, ratio):
    gen = torch.Generator().manual_seed(0)
    n = 4000
    share = sum(replay_count(rows, ratio, gen) for _ in range(n)) / (n * rows)
    assert share == pytest.approx(ratio, abs=0.01)


def test_replay_count_zero_ratio_never_replays():
    gen = torch.Generator().manual_seed(0)
    assert all(replay_count(16, 0.0, gen) == 0 for _ in range(100))


def test_replay_draw_uniform_across_memories_whatever_their_sizes():
    pools, rows = replay_draw([10, 1000, 100], 30000, torch.Generator().manual_seed(1), "uniform")
    share = torch.bincount(pools, minlength=3).double() / len(pools)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)
    sizes = torch.tensor([10, 1000, 100])
    assert (rows >= 0).all() and (rows < sizes[pools]).all()


def test_replay_draw_proportional_follows_sizes():
    pools, _ = replay_draw([100, 300], 20000, torch.Generator().manual_seed(2), "proportional")
    assert (pools == 1).double().mean().item() == pytest.approx(0.75, abs=0.02)


def test_replay_draw_covers_rows_uniformly_and_is_seeded():
    a = replay_draw([5], 5000, torch.Generator().manual_seed(3))
    b = replay_draw([5], 5000, torch.Generator().manual_seed(3))
    assert torch.equal(a[1], b[1])
    counts = torch.bincount(a[1], minlength=5).double() / 5000
    assert torch.allclose(counts, torch.full((5,), 0.2, dtype=torch.float64), atol=0.03)


def test_replay_draw_refuses_an_empty_memory():
    with pytest.raises(ValueError, match="empty replay memory"):
        replay_draw([3, 0], 4, torch.Generator().manual_seed(0))
