"""The replay mixing rules (pure): how many rows are replaced and which memory rows replace them."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_lifelong.data.memory import replay_count, replay_draw
from ray_lifelong.data.sources import DataError


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


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.lists(st.integers(1, 50), min_size=1, max_size=8), st.floats(0.05, 0.95))
def test_the_memory_sample_does_not_depend_on_how_the_stream_is_cut(seed, cuts, fraction):
    """Ray Data cuts the text stream and a packed domain into different blocks: the sample must not care."""
    from ray_lifelong.data.memory import select_rows

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 500, size=(sum(cuts), 16)).astype(np.int32)
    dom = np.full(len(ids), 2, dtype=np.int32)
    whole = select_rows({"input_ids": ids, "domain_id": dom}, fraction=fraction, seed=seed)
    parts, start = [], 0
    for n in cuts:
        parts.append(select_rows({"input_ids": ids[start:start + n], "domain_id": dom[start:start + n]},
                                 fraction=fraction, seed=seed))
        start += n
    np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in parts]), whole["input_ids"])
    np.testing.assert_array_equal(np.concatenate([p["_key"] for p in parts]), whole["_key"])
    assert (whole["_key"] < fraction).all() and (whole["domain_id"] == 2).all()


def test_the_memory_sample_is_uniform_and_seeded():
    from ray_lifelong.data.memory import row_keys, select_rows

    ids = np.arange(40_000 * 4, dtype=np.int32).reshape(40_000, 4)
    keys = row_keys(ids, seed=7)
    assert ((0 <= keys) & (keys < 1)).all()
    assert np.histogram(keys, bins=10, range=(0, 1))[0] == pytest.approx([4000] * 10, rel=0.08)
    kept = select_rows({"input_ids": ids}, fraction=0.06, seed=7)["input_ids"]
    assert len(kept) == pytest.approx(0.06 * len(ids), rel=0.1)
    assert not np.array_equal(kept, select_rows({"input_ids": ids}, fraction=0.06, seed=8)["input_ids"])
    np.testing.assert_array_equal(row_keys(ids[:5], 7), keys[:5])  # a row's key is its own


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4), world=st.integers(1, 4),
       batch=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_a_warmup_epoch_deals_every_row_at_most_once_in_equal_shares(sizes, world, batch, seed):
    from ray_lifelong.data.memory import memory_epoch

    # row r of domain d holds the value 1000 * d + r, so every row is told apart from every other
    pools = [torch.arange(n).unsqueeze(1) + 1000 * d for d, n in enumerate(sizes)]
    memory = (pools, list(range(len(sizes))))
    total = sum(sizes)
    if total // world < batch:
        with pytest.raises(DataError, match="fewer than one micro-batch"):
            next(memory_epoch(memory, seed=seed, rank=0, world=world, batch_size=batch))
        return
    per_rank = [
        list(memory_epoch(memory, seed=seed, rank=r, world=world, batch_size=batch)) for r in range(world)
    ]
    assert len({len(b) for b in per_rank}) == 1  # DDP: every rank takes as many micro-batches
    assert len(per_rank[0]) == (total // world) // batch
    rows = torch.cat([b["input_ids"][:, 0] for bs in per_rank for b in bs])
    assert len(set(rows.tolist())) == len(rows)
    ids = torch.cat([b["domain_id"] for bs in per_rank for b in bs])
    assert torch.equal(ids, rows // 1000)  # each row keeps its domain id
    again = [
        list(memory_epoch(memory, seed=seed, rank=r, world=world, batch_size=batch)) for r in range(world)
    ]
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for x, y in zip(per_rank, again) for a, b in zip(x, y)
    )


def test_warmup_epochs_are_full_passes_in_new_orders():
    from ray_lifelong.data.memory import memory_epoch

    memory = ([torch.arange(40).unsqueeze(1), torch.arange(100, 124).unsqueeze(1)], [0, 3])
    epochs = [
        torch.cat([b["input_ids"][:, 0] for b in memory_epoch(memory, seed=s, rank=0, world=1, batch_size=8)])
        for s in (0, 1)
    ]
    assert all(sorted(e.tolist()) == list(range(40)) + list(range(100, 124)) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 25), min_size=1, max_size=3),
    cut=st.integers(1, 20),
    seed=st.integers(0, 2**31),
)
def test_the_loaded_memory_does_not_depend_on_the_order_its_batches_arrive_in(sizes, cut, seed):
    from ray_lifelong.data.memory import memory_pools

    gen = torch.Generator().manual_seed(seed)
    # few distinct tokens, so rows share prefixes (and some repeat): the order must break ties by later tokens
    rows = torch.randint(0, 3, (sum(sizes), 4), generator=gen)
    domains = torch.cat([torch.full((n,), 2 * d + 1) for d, n in enumerate(sizes)])

    def batches(perm):
        return [
            {"input_ids": rows[perm[i : i + cut]], "domain_id": domains[perm[i : i + cut]]}
            for i in range(0, len(perm), cut)
        ]

    first = memory_pools(batches(torch.arange(len(rows))))
    again = memory_pools(batches(torch.randperm(len(rows), generator=gen)))
    assert first[1] == again[1] == [2 * d + 1 for d in range(len(sizes))]
    for d, (a, b) in enumerate(zip(first[0], again[0])):
        assert torch.equal(a, b)
        mine = rows[domains == 2 * d + 1]
        assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, mine.tolist()))  # the domain's rows, all
        assert a.tolist() == sorted(a.tolist())  # lexicographic


def test_an_empty_memory_is_a_clear_error():
    from ray_lifelong.data.memory import memory_pools

    with pytest.raises(DataError, match="hold no sequence"):
        memory_pools([])


def test_memories_read_back_from_their_files_in_any_cut_as_one_canonical_pool(tmp_path):
    """Workers read the memories straight from Parquet: the pools are those of the rows, however the
    writer cut them into files, and a memory without its marker is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_lifelong.data import markers
    from ray_lifelong.data.memory import MARKER, memory_pools, read_memories

    rng = np.random.default_rng(0)
    rows = {3: rng.integers(0, 50, (7, 4), dtype=np.int32), 5: rng.integers(0, 50, (4, 4), dtype=np.int32)}

    def write(name: str, cuts: list[int], d: int) -> str:
        uri = str(tmp_path / name)
        (tmp_path / name).mkdir()
        for i, part in enumerate(np.split(rows[d], cuts)):
            table = pa.table({"input_ids": pa.array(list(part), type=pa.list_(pa.int32())),
                              "domain_id": pa.array(np.full(len(part), d, np.int32))})
            pq.write_table(table, f"{uri}/part-{i:06d}.parquet")
        markers.write_marker(uri, MARKER, {"uri": uri})
        return uri

    one = read_memories([write("a", [], 3), write("b", [1, 3], 5)])
    cut = read_memories([write("c", [2, 5], 3), write("d", [], 5)])
    direct = memory_pools([{"input_ids": torch.from_numpy(rows[d]).long(),
                            "domain_id": torch.full((len(rows[d]),), d)} for d in (5, 3)])
    for pools in (one, cut):
        assert pools[1] == [3, 5] == direct[1]
        assert all(torch.equal(p, q) for p, q in zip(pools[0], direct[0]))
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        read_memories([str(tmp_path / "e")])
