"""A stage's stream on a worker: the first epoch kept and replayed by later epochs (every epoch is the
stream's order without a shuffle buffer), the next stage's stream started early; the data is a stand-in
for a Ray Data shard that counts how often it was streamed."""

from __future__ import annotations

import pytest
import torch

from ray_lifelong.config import load_config
from ray_lifelong.stage.loop import _Stream
from ray_lifelong.stage.spec import StageSpec


class _Shard:
    def __init__(self, rows: int):
        self.rows, self.streamed = rows, 0

    def iter_torch_batches(self, batch_size: int, **_):
        self.streamed += 1
        for start in range(0, self.rows - batch_size + 1, batch_size):
            yield {"input_ids": torch.arange(start, start + batch_size).view(-1, 1).repeat(1, 8),
                   "domain_id": torch.zeros(batch_size, dtype=torch.long)}


def _spec(*overrides: str) -> StageSpec:
    cfg = load_config(None, ["train.micro_batch_size=4", *overrides])
    return StageSpec(cfg=cfg, index=0, domain="d", eval_domains=["d"], steps=10, batch_size=4, lr=1e-3,
                     tokenizer_files={})


def _ids(batches) -> list[int]:
    return [int(b["input_ids"][0, 0]) for b in batches]


def test_later_epochs_replay_the_first_without_streaming_again():
    shard = _Shard(rows=12)
    s = _Stream(_spec(), shard)
    first = _ids(s.epoch(0))
    assert first == [0, 4, 8] and shard.streamed == 1
    assert _ids(s.epoch(1)) == first and _ids(s.epoch(2)) == first and shard.streamed == 1


def test_a_restart_in_a_later_epoch_reads_the_first_back_once():
    shard = _Shard(rows=12)
    s = _Stream(_spec(), shard)
    assert _ids(s.epoch(3)) == [0, 4, 8] and shard.streamed == 1
    assert _ids(s.epoch(4)) == [0, 4, 8] and shard.streamed == 1


@pytest.mark.parametrize("override", ["data.epoch_cache_mb=0", "data.shuffle_buffer=16"])
def test_without_the_cache_or_with_a_shuffle_buffer_every_epoch_streams(override):
    shard = _Shard(rows=12)
    s = _Stream(_spec(override), shard)
    for e in range(3):
        assert _ids(s.epoch(e)) == [0, 4, 8]
    assert shard.streamed == 3


def test_a_first_epoch_larger_than_the_cache_is_streamed_again():
    shard = _Shard(rows=40_000)  # 4 x 8 int64 + 4 int64 = 288 bytes a batch: ~2.8 MB an epoch
    s = _Stream(_spec("data.epoch_cache_mb=1"), shard)
    n = len(list(s.epoch(0)))
    assert s.cache is None and len(list(s.epoch(1))) == n and shard.streamed == 2


def test_an_interrupted_first_epoch_is_not_replayed_as_a_whole_one():
    shard = _Shard(rows=12)
    s = _Stream(_spec(), shard)
    it = s.epoch(0)
    next(it)  # the stage ended after one batch
    assert _ids(s.epoch(1)) == [0, 4, 8] and shard.streamed == 2


def test_the_next_stream_starts_early_and_its_stage_finds_the_batches_waiting():
    now, later = _Shard(rows=12), _Shard(rows=8)
    s, nxt = _Stream(_spec(), now), _Stream(_spec(), later)
    s.then, s.left = nxt, 3
    it = s.epoch(0)
    next(it)  # the first batch gives no pace yet
    assert nxt.early is None and later.streamed == 0
    next(it)  # the second: a fast stage with little left, the next stage's stream starts
    assert nxt.early is not None
    nxt.early[0].join()
    assert later.streamed == 1
    assert _ids(nxt.epoch(0)) == [0, 4] and later.streamed == 1


@pytest.mark.parametrize(("left", "pace_s", "due"), [
    (1000, 0.01, 2),  # a fast stage: as soon as its pace is known
    (100, 0.5, 40),  # 60 batches left at 0.5 s: the lead of 30 s
    (100, 10.0, 50),  # a slow stage: half way, before its last 30 s
])
def test_the_next_stream_starts_within_the_lead_of_the_stages_end_or_half_way(left, pace_s, due, monkeypatch):
    import itertools
    import types

    from ray_lifelong.stage import loop

    assert loop.NEXT_STREAM_LEAD_S == 30.0
    clock = (k * pace_s for k in itertools.count())
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    s = _Stream(_spec(), _Shard(rows=4))
    s.left = left
    assert [n for n in range(1, left + 1) if s._next_due()][0] == due
