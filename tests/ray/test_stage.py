"""One stage on a real local Ray cluster with 2 training workers (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ray_lifelong.config import load_config
from ray_lifelong.data.run_tokenizer import prepare_tokenizer
from ray_lifelong.data.sources import DataError
from ray_lifelong.stage.checkpoint import load_state
from ray_lifelong.stage.run import run_stage
from ray_lifelong.stage.spec import StageSpec, read_tokenizer_files
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def inputs(ray_4cpus, demo_corpus, tmp_path_factory):
    """The demo corpus with the tokenizer and validation rows that every stage here shares (made once: the
    tests change the model, the steps and the training sources, never what these depend on)."""
    from ray_lifelong.data.stream import StreamOptions, validation_rows

    cfg = load_config(None, tiny_overrides(demo_corpus, tmp_path_factory.mktemp("cfg")))
    tok_dir = prepare_tokenizer(cfg, tmp_path_factory.mktemp("tok"))
    valid = validation_rows(cfg.data.domains, StreamOptions(tok_dir, cfg.model.arch, cfg.data), None)
    return demo_corpus, tok_dir, valid


def make_stage(inputs, out, extra=(), steps=12):
    from ray_lifelong.data.stream import BadRecordLog

    root, tok_dir, valid = inputs
    cfg = load_config(None, tiny_overrides(root, out, steps=steps) + list(extra))
    spec = StageSpec(
        cfg=cfg,
        index=0,
        domain="sports",
        eval_domains=["sports", "astronomy"],
        steps=cfg.train.steps,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        tokenizer_files=read_tokenizer_files(tok_dir),
    )
    log = BadRecordLog.remote()  # its own: a test counts the bad records of its stage alone
    return spec, dict(tokenizer_dir=tok_dir, storage_path=str(Path(out) / "ckpt"), valid=valid, bad_log=log)


def test_stage_trains_resumes_after_a_worker_crash_and_restores(inputs, tmp_path):
    marker = tmp_path / "crashed"
    spec, kw = make_stage(
        inputs,
        tmp_path,
        steps=16,
        extra=["debug.crash_at_step=10", f"debug.crash_marker={marker}", "train.checkpoint_every=4"],
    )
    # Ray Train registers a reported checkpoint asynchronously: crash well after the step-8 one.
    res = run_stage(spec, **kw)
    assert marker.exists(), "the injected crash did not happen"
    assert res.restarts == 1
    steps = [h["step"] for h in res.history]
    assert steps == sorted(set(steps)) == list(range(2, 17, 2)), steps  # nothing repeated or lost
    losses = [h["loss"] for h in res.history]
    assert res.steps == 16 and len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses  # it learns
    assert res.tokens == 16 * 8 * 32
    assert set(res.ppl) == {"sports", "astronomy"}
    assert res.ppl["sports"] < res.ppl["astronomy"]  # trained on sports only
    ckpt = Path(res.checkpoint_path)
    assert {"model", "train_state.pt", "state.json", "config.yaml"} <= {p.name for p in ckpt.iterdir()}
    assert load_state(ckpt).step == 16
    snapshot = json.loads(
        (
            Path(kw["storage_path"])
            / f"{spec.cfg.run_name}-stage0-sports"
            / "checkpoint_manager_snapshot.json"
        ).read_text()
    )
    assert snapshot  # Ray Train's own record of the reported checkpoints

    # Re-running the same stage name restores its last checkpoint: no step is trained again, and the
    # restored weights give exactly the same validation perplexities.
    weights = {k: v.clone() for k, v in _load(ckpt).state_dict().items()}
    again = run_stage(spec, **kw)
    assert again.restarts == res.restarts + 1 and again.steps == 16 and len(again.history) == len(res.history)
    assert again.ppl == pytest.approx(res.ppl, rel=1e-6)
    for k, v in _load(Path(again.checkpoint_path)).state_dict().items():
        assert torch.equal(v, weights[k]), k


def _load(ckpt: Path):
    from ray_lifelong.models.build import load_model

    return load_model(str(ckpt / "model"))


def test_bad_record_fails_stage_with_file_and_line(inputs, demo_corpus, tmp_path):
    import gzip
    import shutil

    bad_dir = tmp_path / "bad"
    shutil.copytree(demo_corpus / "sports", bad_dir / "sports")
    with gzip.open(bad_dir / "sports" / "train-01.jsonl.gz", "ab") as f:
        f.write(b'{"text": broken\n')
    # one worker: the error is the data's, whichever worker reads the bad line
    spec, kw = make_stage(inputs, tmp_path, steps=4, extra=["ray.max_failures=0", "scaling.num_workers=1"])
    dom = spec.cfg.data.domains[0]
    dom.train = [str(bad_dir / "sports" / "train-*.jsonl.gz")]
    with pytest.raises(DataError, match=r"train-01\.jsonl\.gz, line \d+: invalid JSON"):
        run_stage(spec, **kw)

    spec.cfg.data.on_bad_record = "skip"
    res = run_stage(spec, **{**kw, "storage_path": str(tmp_path / "ckpt-skip")})
    assert res.bad_records["count"] == 1 and res.steps == 4
    assert "train-01.jsonl.gz" in res.bad_records["examples"][0]


def test_empty_domain_is_a_clear_error(inputs, tmp_path):
    import gzip

    empty = tmp_path / "empty"
    empty.mkdir()
    with gzip.open(empty / "train-00.jsonl.gz", "wb") as f:
        f.write(b"\n\n")  # blank lines only: no document at all
    spec, kw = make_stage(inputs, tmp_path, steps=4, extra=["ray.max_failures=0", "scaling.num_workers=1"])
    spec.cfg.data.domains[0].train = [str(empty / "train-00.jsonl.gz")]
    with pytest.raises(DataError, match=r"domain 'sports'.*yielded no sequence"):
        run_stage(spec, **kw)


@pytest.fixture(scope="module")
def small_stage(inputs, tmp_path_factory):
    """A 4-step first stage of the tiny model, which both growth tests continue."""
    spec0, kw = make_stage(inputs, tmp_path_factory.mktemp("small"), steps=4)
    return spec0, kw, run_stage(spec0, **kw)


@pytest.mark.parametrize("optimizer", ["carry", "reset"])
def test_growth_at_stage_start_on_the_workers(small_stage, tmp_path, optimizer):
    import copy

    import ray.train

    from ray_lifelong.config import GrowthConfig

    spec0, kw, first = small_stage
    kw = {**kw, "storage_path": str(tmp_path / "ckpt")}
    assert first.growth is None and first.model_sizes["hidden_size"] == 32
    cfg = copy.deepcopy(spec0.cfg)
    # exact
    cfg.data.domains[1].grow = GrowthConfig(
        num_layers=2,
        hidden_size=64,
        intermediate_size=128,
        depth_init="identity",
        optimizer=optimizer,
        noise_std=0.0,
    )
    spec1 = StageSpec(
        cfg=cfg,
        index=1,
        domain="astronomy",
        eval_domains=spec0.eval_domains,
        steps=4,
        batch_size=8,
        lr=cfg.train.lr,
        tokenizer_files=spec0.tokenizer_files,
        init_checkpoint=ray.train.Checkpoint(first.checkpoint_path),
        schedule=(4, 8) if optimizer == "carry" else None,
    )
    res = run_stage(spec1, **kw)
    # lr_scope=run continues one schedule (no re-warmup): at stage step 2 the multiplier is 1 - 6/8
    want = 0.25 if optimizer == "carry" else 0.5
    assert res.history[0]["step"] == 2 and res.history[0]["lr"] == pytest.approx(cfg.train.lr * want)
    g = res.growth
    assert g["before"]["num_hidden_layers"] == 1 and g["after"] == res.model_sizes
    assert res.model_sizes == {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "intermediate_size": 128,
    }
    assert g["params_after"] > g["params_before"] and g["optimizer"] == optimizer
    assert g["max_logit_error"] < 1e-4  # integer width x2 + identity depth is exact
    assert res.train_flops > first.train_flops  # FLOPs follow the grown model's size
    blob = torch.load(Path(res.checkpoint_path) / "train_state.pt", weights_only=False)["optimizer"]
    steps = {int(v["step"]) for v in blob["state"].values()}
    # carried moments keep counting from the first stage's 4 steps (except brand-new identity layers)
    assert (max(steps) == 8) if optimizer == "carry" else (steps == {4})


def test_ki_stage_distils_from_a_frozen_teacher(inputs, tmp_path):
    from ray_lifelong.config import ModelConfig, TeacherConfig
    from ray_lifelong.data.tokenizer import load_tokenizer
    from ray_lifelong.models.build import build_model

    spec, kw = make_stage(inputs, tmp_path, steps=8, extra=["train.log_every=1"])
    tok = load_tokenizer(kw["tokenizer_dir"])
    small = ModelConfig(
        arch="bert",
        num_layers=1,
        hidden_size=16,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    build_model(small, len(tok), seed=3).save_pretrained(tmp_path / "teacher")
    spec.cfg.data.domains[0].teacher = TeacherConfig(
        path=str(tmp_path / "teacher"), schedule="linear", steps=4
    )
    res = run_stage(spec, **kw)
    alphas = [h["alpha"] for h in res.history]
    assert alphas[:4] == pytest.approx([1.0, 0.75, 0.5, 0.25]) and alphas[4:] == [0.0] * 4
    assert all(h["kl"] > 0 for h in res.history[:4]) and all(h["kl"] == 0 for h in res.history[4:])
    assert res.teacher_flops > 0 and res.teacher_s > 0
    # the teacher ran on exactly the 4 inheritance steps' sequences: 8 per step, summed over both workers
    from ray_lifelong.flops import forward_flops_per_sequence, logit_positions

    vocab = json.loads((tmp_path / "teacher" / "config.json").read_text())["vocab_size"]
    small_fwd = forward_flops_per_sequence(
        num_layers=1,
        hidden=16,
        ffn=32,
        vocab=vocab,
        seq_len=32,
        logit_positions=logit_positions("bert", 32, 0.15),
    )
    assert res.teacher_flops == pytest.approx(4 * 8 * small_fwd, rel=1e-9)
    assert small_fwd < res.train_flops / (8 * 8) / 3  # a smaller model's forward, not the student's

    build_model(small, len(tok) + small.vocab_multiple, seed=3).save_pretrained(tmp_path / "other_vocab")
    spec.cfg.data.domains[0].teacher = TeacherConfig(path=str(tmp_path / "other_vocab"))
    spec.teacher_dirs = {}
    with pytest.raises(ValueError, match="same tokenizer"):
        run_stage(spec, **{**kw, "storage_path": str(tmp_path / "x")})


def test_a_compiled_stage_trains(inputs, tmp_path):
    # train.compile wraps the (DDP) objective in torch.compile; inductor compiles for the CPU here
    spec, kw = make_stage(
        inputs,
        tmp_path,
        steps=4,
        extra=[
            "train.compile=true",
            "scaling.num_workers=1",
            "train.micro_batch_size=8",
            "train.log_every=1",
        ],
    )
    res = run_stage(spec, **kw)
    losses = [h["loss"] for h in res.history]
    assert res.steps == 4 and len(losses) == 4 and all(0 < x < 20 for x in losses), losses
