"""ELLE's pieces in the real pipeline on a local Ray cluster: memory, replay, prompts, FRW, logit KD,
joint."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ray_lifelong.config import load_config
from ray_lifelong.data.tokenizer import load_tokenizer, prompt_token
from ray_lifelong.flops import planned_stages
from ray_lifelong.models.build import padded_vocab
from ray_lifelong.pipeline import run_lifelong
from tests.conftest import elle_overrides, tiny_overrides

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def elle_run(ray_4cpus, demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("elle")
    # pretokenized: each domain packed once; the stream and the memory read the packed rows (which
    # tests/ray/test_packed.py shows equal the text stream's). A worker of the grown stage dies once in
    # the middle of its function-recovering warmup (step 5 of 6); slowed steps give Ray Train time to register
    # the checkpoints reported before it (step 2 at least).
    cfg = load_config(
        None,
        elle_overrides(
            demo_corpus,
            out,
            "data.pretokenize=true",
            "continual.frw.steps=6",
            "train.checkpoint_every=2",
            "debug.crash_stage=1",
            "debug.crash_at_step=5",
            f"debug.crash_marker={out}/crashed",
            "debug.slow_step_s=0.15",
        ),
    )
    return cfg, run_lifelong(cfg), out / "elle"


def test_memory_is_a_prompted_sample_of_the_domain_written_once(elle_run):
    cfg, res, rdir = elle_run
    (mem,) = res["memories"]
    assert mem["uri"] == str(rdir / "memory" / "00-sports")
    table = pq.read_table(mem["uri"])
    assert table.num_rows == mem["sequences"] > 0
    ids = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False))
    tok = load_tokenizer(str(rdir / "tokenizer"))
    assert (ids[:, 0] == tok.cls_token_id).all() and (
        ids[:, 1] == tok.convert_tokens_to_ids(prompt_token("sports"))
    ).all()
    assert set(table.column("domain_id").to_pylist()) == {0}
    (packed,) = (rdir / "packed").glob("00-sports-*")  # the memory samples the packed rows
    packed_rows = {
        r.tobytes()
        for r in np.stack(pq.read_table(packed).column("input_ids").to_numpy(zero_copy_only=False))
    }
    assert {r.tobytes() for r in ids} <= packed_rows


def test_growth_then_frw_then_replay_are_recorded(elle_run):
    cfg, res, rdir = elle_run
    s1 = res["stages"][1]
    frw = s1["frw"]
    assert frw["phase"] == "frw" and frw["steps"] == 6 and frw["growth"]["after"]["hidden_size"] == 64
    # the warmup resumed from its checkpoint after the crash: nothing lost or repeated, one restart
    assert (rdir.parent / "crashed").exists() and frw["restarts"] == 1 == s1["restarts"]
    assert [h["step"] for h in frw["history"]] == [2, 4, 6] and [h["step"] for h in s1["history"]] == [
        2,
        4,
        6,
        8,
    ]
    assert frw["tokens"] == 6 * 8 * 32 and s1["tokens"] == 8 * 8 * 32
    assert s1["nodes"] == frw["nodes"] and len(s1["nodes"]) == 2  # one Ray Train run: the same two workers
    assert s1["growth"] == frw["growth"] and s1["model_sizes"]["num_hidden_layers"] == 2
    assert frw["history"][-1]["lr"] == pytest.approx(cfg.train.lr)  # warmup 1 step, then constant
    assert s1["stage_flops"] == pytest.approx(s1["train_flops"] + frw["train_flops"])
    # 25% of 8 steps x 8 rows replaced by memory rows, stochastically rounded per micro-batch of 4
    assert 4 <= s1["replayed_sequences"] <= 32
    assert res["stages"][0]["replayed_sequences"] == 0 and "frw" not in res["stages"][0]
    assert len(res["AP"]) == 2 and len(res["cumulative_flops"]) == 2


def test_the_planned_budget_is_what_the_run_spent(elle_run):
    """flops.planned_stages, computed from the config alone, gives each stage's steps (FRW included) and
    FLOPs."""
    cfg, res, rdir = elle_run
    rows = padded_vocab(len(load_tokenizer(str(rdir / "tokenizer"))), cfg.model.vocab_multiple)
    plan = planned_stages(cfg, rows)
    assert [p["steps"] for p in plan] == [
        s["steps"] + s.get("frw", {}).get("steps", 0) for s in res["stages"]
    ]
    assert [p["flops"] for p in plan] == pytest.approx([s["stage_flops"] for s in res["stages"]], rel=1e-9)
    assert plan[1]["sizes"] == (
        res["stages"][1]["model_sizes"]["num_hidden_layers"],
        res["stages"][1]["model_sizes"]["hidden_size"],
        res["stages"][1]["model_sizes"]["intermediate_size"],
    )


def test_final_export_keeps_the_prompt_tokens(elle_run):
    _, _, rdir = elle_run
    tok = load_tokenizer(str(rdir / "final_model"))
    for d in ("sports", "astronomy"):
        assert tok.convert_tokens_to_ids(prompt_token(d)) != tok.unk_token_id


def test_resume_reuses_stages_and_memory(elle_run):
    cfg, res, rdir = elle_run
    marker = rdir / "memory" / "00-sports" / "_memory.json"
    packed = sorted((rdir / "packed").glob("*/_packed.json"))
    assert [p.parent.name[:5] for p in packed] == ["00-sp", "01-as"]
    before = [p.stat().st_mtime_ns for p in [marker, *packed]]
    again = run_lifelong(cfg, resume=True)
    assert [p.stat().st_mtime_ns for p in [marker, *packed]] == before
    assert again["ppl_matrix"] == res["ppl_matrix"]


def test_a_stage_that_finished_without_its_record_is_reported_again_not_retrained(elle_run):
    """The driver died after the last stage's final checkpoint but before its record: the resumed run's
    workers find that checkpoint, report the stage again from it, and train nothing."""
    cfg, res, rdir = elle_run
    marker = rdir / "stages" / "01-astronomy" / "stage.json"
    now = marker.read_text()
    marker.unlink()
    try:
        again = run_lifelong(cfg, resume=True)
        assert again["ppl_matrix"] == res["ppl_matrix"]
        s1, before = again["stages"][1], res["stages"][1]
        assert s1["checkpoint"] == before["checkpoint"] and s1["history"] == before["history"]
        assert s1["restarts"] == before["restarts"] + 1 and s1["frw"]["steps"] == before["frw"]["steps"]
        assert marker.exists()
    finally:
        marker.write_text(now)


def test_a_run_dir_with_the_warmup_recorded_as_its_own_stage_resumes_with_its_record(elle_run):
    """Run dirs of earlier versions ran the warmup as a stage of its own, with its own marker."""
    cfg, res, rdir = elle_run
    marker = rdir / "stages" / "01-astronomy" / "stage.json"
    now = marker.read_text()
    rec = json.loads(now)
    old = rdir / "stages" / "01-astronomy-frw" / "stage.json"
    old.parent.mkdir()
    try:
        old.write_text(json.dumps(rec.pop("frw")))
        marker.write_text(json.dumps(rec))
        again = run_lifelong(cfg, resume=True)
        assert again["stages"][1]["frw"] == res["stages"][1]["frw"]
        assert again["stages"][1]["stage_flops"] == res["stages"][1]["stage_flops"]
    finally:
        marker.write_text(now)
        old.unlink()
        old.parent.rmdir()


def test_the_domain_phase_after_the_warmup_trains_as_its_own_run_would(ray_4cpus, demo_corpus, tmp_path):
    """The warmup runs first in its stage's Ray Train run; what follows is exactly the domain's stage run on
    its
    own from the warmed-up model (fresh optimizer and schedule, the same batches, replay draws and dropout
    masks). One worker, so the stream is not split between workers by timing; dropout on (the default), so a
    model left in eval mode by ``from_pretrained`` would train differently."""
    import copy

    import ray.train

    from ray_lifelong.data.stream import StreamOptions, validation_rows
    from ray_lifelong.pipeline import stage_stream
    from ray_lifelong.stage.run import run_stage
    from ray_lifelong.stage.spec import StageSpec, read_tokenizer_files

    cfg = load_config(
        None,
        elle_overrides(
            demo_corpus,
            tmp_path,
            "model.arch=gpt2",
            "scaling.num_workers=1",
            "continual.frw.steps=2",
            "train.checkpoint_every=100",
            "run_name=eq",
        ),
    )
    assert cfg.model.dropout > 0
    res = run_lifelong(cfg)
    rdir = tmp_path / "eq"
    # the checkpoint reported where the warmup ends and the domain phase begins (phase main, step 0)
    # both stages trained in one Ray Train run, named after its first
    states = {p.parent: json.loads(p.read_text())
              for p in (rdir / "checkpoints" / "eq-stage0-sports").glob("checkpoint_*/state.json")}
    (switch,) = [c for c, s in states.items() if s["stage"] == 1 and s["phase"] == "main" and s["step"] == 0]
    alone = copy.deepcopy(cfg)
    alone.data.domains[1].grow = None  # the checkpoint holds the grown model already
    tok = str(rdir / "tokenizer")
    opts = StreamOptions(tok, cfg.model.arch, cfg.data)
    spec = StageSpec(
        cfg=alone,
        index=1,
        domain="astronomy",
        eval_domains=["sports", "astronomy"],
        tokenizer_files=read_tokenizer_files(tok),
        batch_size=cfg.train.batch_size,
        steps=cfg.train.steps,
        lr=cfg.train.lr,
        init_checkpoint=ray.train.Checkpoint(str(switch)),
        replay_uris=[m["uri"] for m in res["memories"]],
    )
    own = run_stage(
        spec,
        tokenizer_dir=tok,
        storage_path=str(tmp_path / "alone"),
        valid=validation_rows(cfg.data.domains, opts, None, prompts=True),
        train_ds=stage_stream(cfg, 1, opts, None),
    )
    s1 = res["stages"][1]
    assert s1["frw"]["steps"] == 2 and own.growth is None
    assert [h["loss"] for h in own.history] == pytest.approx([h["loss"] for h in s1["history"]], rel=1e-6)
    assert [own.ppl[d] for d in ("sports", "astronomy")] == pytest.approx(res["ppl_matrix"][1], rel=1e-6)
    assert own.replayed_sequences == s1["replayed_sequences"]


def test_logit_kd_distils_from_the_previous_model_on_replayed_rows(ray_4cpus, demo_corpus, tmp_path):
    cfg = load_config(
        None,
        elle_overrides(
            demo_corpus,
            tmp_path,
            "continual.growth=fixed",
            "continual.prompts=false",
            "continual.logit_kd.weight=1.0",
            "run_name=kd",
        ),
    )
    res = run_lifelong(cfg)
    s1 = res["stages"][1]
    assert "frw" not in s1 and s1["growth"] is None
    assert s1["teacher_flops"] > 0 and res["stages"][0]["teacher_flops"] == 0
    assert any(h["kl"] > 0 for h in s1["history"])


def test_joint_stream_holds_every_domain_so_far(ray_4cpus, demo_corpus, tmp_path):
    from ray_lifelong.data.run_tokenizer import prepare_tokenizer
    from ray_lifelong.data.stream import StreamOptions
    from ray_lifelong.pipeline import stage_stream

    cfg = load_config(None, tiny_overrides(demo_corpus, tmp_path) + ["continual.joint=true"])
    tok = prepare_tokenizer(cfg, tmp_path / "tok")
    opts = StreamOptions(tok, cfg.model.arch, cfg.data)

    def seen(i):
        batches = stage_stream(cfg, i, opts).iter_batches(batch_size=256, batch_format="numpy")
        return set(np.concatenate([b["domain_id"] for b in batches]).tolist())

    assert seen(0) == {0} and seen(1) == {0, 1}
    # mixed from the start: a stage shorter than the stream still trains on every domain so far
    ids = np.concatenate(
        [
            b["domain_id"]
            for b in stage_stream(cfg, 1, opts).iter_batches(batch_size=256, batch_format="numpy")
        ]
    )
    head = ids[: len(ids) // 4]
    assert 0.2 < (head == 1).mean() < 0.8, np.bincount(head)
    naive = load_config(None, tiny_overrides(demo_corpus, tmp_path))
    assert set(
        np.concatenate(
            [
                b["domain_id"]
                for b in stage_stream(naive, 1, opts).iter_batches(batch_size=256, batch_format="numpy")
            ]
        ).tolist()
    ) == {1}


def test_write_memory_is_idempotent_and_redoes_a_partial_one(ray_4cpus, tmp_path):
    import ray

    from ray_lifelong.data.memory import read_marker, write_memory

    ds = ray.data.from_items(  # a few blocks, as a stream has (the default cuts 400 rows into 200)
        [{"input_ids": np.arange(4, dtype=np.int32) + i, "domain_id": np.int32(3)} for i in range(400)],
        override_num_blocks=4,
    )
    uri = str(tmp_path / "m")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "junk.parquet").write_bytes(b"partial write")  # a driver died here before
    rec = write_memory(ds, uri, fraction=0.25, max_sequences=None, seed=0)
    assert 60 < rec["sequences"] < 140 and rec["by_domain"] == {"3": rec["sequences"]}
    assert not (tmp_path / "m" / "junk.parquet").exists()
    assert read_marker(uri) == rec
    assert write_memory(ds, uri, fraction=0.9, max_sequences=None, seed=1) == rec  # done: not resampled
    capped = write_memory(ds, str(tmp_path / "c"), fraction=0.5, max_sequences=20, seed=0)
    assert capped["sequences"] == 20 == pq.read_table(str(tmp_path / "c")).num_rows


def test_grow_train_new_trains_only_the_added_blocks_also_across_a_restart(ray_4cpus, demo_corpus, tmp_path):
    """LLaMA Pro's recipe on a Llama: stage 1 adds two blocks on top and trains only them (a worker dies
    in the middle: the restarted stage still trains only them); every old weight ends the stage exactly as
    stage 0 left it."""
    from ray_lifelong.models.build import load_model

    doms = (f"[{{name: sports, train: ['{demo_corpus}/sports/train-*.jsonl.gz'], "
            f"valid: ['{demo_corpus}/sports/valid-*.jsonl.gz']}}, "
            f"{{name: astronomy, train: ['{demo_corpus}/astronomy/train-*.jsonl.gz'], "
            f"valid: ['{demo_corpus}/astronomy/valid-*.jsonl.gz'], "
            f"grow: {{num_layers: 3, depth_placement: top, train: new}}}}]")
    cfg = load_config(None, tiny_overrides(demo_corpus, tmp_path, arch="llama", steps=8) + [
        f"data.domains={doms}", "model.num_kv_heads=1", "run_name=pro", "train.checkpoint_every=2",
        "debug.crash_stage=1", "debug.crash_at_step=5", f"debug.crash_marker={tmp_path}/crashed",
        "debug.slow_step_s=0.15"])
    res = run_lifelong(cfg)
    s1 = res["stages"][1]
    assert (tmp_path / "crashed").exists() and s1["restarts"] == 1
    grew = s1["growth"]
    assert grew["train"] == "new" and 0 < grew["trainable_params"] < grew["params_after"]
    import ray.train

    with ray.train.Checkpoint(res["stages"][0]["checkpoint"]).as_directory() as d:
        before = dict(load_model(f"{d}/model", "llama").named_parameters())
    after = dict(load_model(str(tmp_path / "pro" / "final_model"), "llama").named_parameters())
    assert len(after) > len(before)
    for name, p in before.items():  # the old blocks (0), embeddings, final norm, head: untouched
        assert torch.equal(after[name], p), name
    trained = [n for n in after if n.startswith(("model.layers.1.", "model.layers.2."))]
    assert any(after[n].abs().sum() > 0 for n in trained if "o_proj" in n or "down_proj" in n)
