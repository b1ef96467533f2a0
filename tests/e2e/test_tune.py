"""``ray-lifelong tune`` through the real command line: a 2-trial ASHA sweep of KI on demo data with its state
on S3 (moto on 127.0.0.1), its driver killed mid-sweep and the sweep restored from there, then the best config
run as it is written; and a PBT sweep whose trials clone each other between segments."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from ray_lifelong.config import load_config
from tests.conftest import REPO, moto_fs, moto_server, one_domain, tiny_overrides
from tests.e2e.test_pipeline import cli, kill_cli_when

pytestmark = [pytest.mark.e2e]


def sweep_overrides(demo_corpus: Path, out: Path) -> list[str]:
    return tiny_overrides(demo_corpus, out, arch="gpt2", steps=8) + [
        "run_name=sw",
        "ray.num_cpus=4",
        "train.eval_every=4",
        "train.checkpoint_every=2",
        "scaling.num_workers=1",
        "ki.teacher_steps=4",
        "ki.teacher_model.num_layers=1",
        "ki.teacher_model.hidden_size=16",
        "ki.teacher_model.num_heads=2",
        "ki.teacher_model.intermediate_size=32",
        one_domain(demo_corpus),
        "tune.num_samples=2",
        "tune.max_concurrent_trials=2",
        "tune.seed=3",
        # a smaller space than the config's: the demo of the command, not a search
        "tune.space={ki.inherit.steps: {choice: [2, 8]}, train.lr: {loguniform: [1.0e-3, 3.0e-3]}}",
    ]


def _stored(fs, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    try:
        return [i.path for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True))]
    except (FileNotFoundError, OSError):
        return []


@pytest.mark.timeout(1800)
def test_a_sweep_on_s3_survives_a_killed_driver_restores_from_there_and_its_best_config_runs(
        demo_corpus, tmp_path):
    """``tune.storage_path=s3://...?endpoint_override=...`` with Optuna's search: the experiment (state,
    searcher state, trial results) is written to the bucket; the driver killed mid-sweep, a second run without
    --resume is refused because of what is there, and --resume restores the sweep from S3 and finishes it;
    --resume of the finished sweep writes the same table again; the best config runs as it is written."""
    out = tmp_path / "sweeps"
    base = out / "sw"
    with moto_server() as endpoint:
        fs = moto_fs(endpoint)
        fs.create_dir("sweeps")
        query = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
        overrides = [o for o in sweep_overrides(demo_corpus, out) if not o.startswith("tune.space=")] + [
            f"tune.storage_path=s3://sweeps/ki?{query}",
            # Optuna (the [tune] extra) here, random search in the PBT test: its state is restored too
            "tune.search=optuna",
            "tune.space={ki.inherit.steps: {choice: [2, 8]}, train.lr: {loguniform: [1.0e-3, 3.0e-3]}}",
        ]
        # kill the driver (and the Ray processes it started) once a trial has written a checkpoint and the
        # experiment's state is in the bucket
        kill_cli_when(
            lambda: list((base / "trials").glob("*/checkpoints/*/checkpoint_*"))
            and any(p.startswith("sweeps/ki/tune/experiment_state") for p in _stored(fs, "sweeps/ki")),
            "tune",
            str(REPO / "configs/tune_ki.yaml"),
            *overrides,
            poll_s=1,
        )
        assert not (base / "sweep_results.csv").exists()
        teacher_marker = next((base / "sw-teacher" / "stages").glob("*/stage.json"))
        teacher_mtime = teacher_marker.stat().st_mtime

        # without --resume the command refuses to start over the sweep in the bucket
        again = cli("tune", str(REPO / "configs/tune_ki.yaml"), *overrides, timeout=600)
        assert again.returncode == 2 and "s3://sweeps/ki/tune?" in again.stderr, again.stderr[-2000:]
        assert "--resume" in again.stderr and "[ray]" not in again.stdout  # refused before starting Ray

        resumed = cli("tune", str(REPO / "configs/tune_ki.yaml"), *overrides, "--resume", timeout=1200)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "restoring the sweep in s3://sweeps/ki/tune" in resumed.stdout, resumed.stdout[-3000:]
        assert "teacher already trained" in resumed.stdout
        assert teacher_marker.stat().st_mtime == teacher_mtime  # the teacher was not trained again

        stored = _stored(fs, "sweeps/ki")
        assert any(p.startswith("sweeps/ki/tune/searcher-state") for p in stored), stored
        # each trial's reported results went to the bucket, not to a local folder
        assert sum(p.endswith("/result.json") for p in stored) == 2, stored
        assert not (base / "tune").exists()

        # --resume of the finished sweep reads its results from S3 and writes the same table, without Ray
        first = (base / "sweep_results.csv").read_text()
        (base / "sweep_results.csv").unlink()
        restored = cli("tune", str(REPO / "configs/tune_ki.yaml"), *overrides, "--resume", timeout=600)
        assert restored.returncode == 0, restored.stdout[-3000:] + restored.stderr[-3000:]
        assert "every trial of the sweep in s3://sweeps/ki/tune" in restored.stdout, restored.stdout[-3000:]
        assert "[ray]" not in restored.stdout
        assert (base / "sweep_results.csv").read_text() == first

        with open(base / "sweep_results.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 2 and all(not r["error"] for r in rows), rows
        assert {r["ki.inherit.steps"] for r in rows} <= {"2", "8"}
        assert all(1e-3 <= float(r["train.lr"]) <= 3e-3 for r in rows)
        full = [r for r in rows if r["finished"] == "True"]
        for r in rows:  # a finished trial's run completed its stage; ASHA stopped the others at a validation
            assert (r["finished"] == "True") == (base / "trials" / r["trial_id"] / "results.json").exists()
            assert r["stopped_early"] == str(r["finished"] == "False")
            assert int(r["step"]) == (8 if r["finished"] == "True" else 4)
            # the console's line for a trial that ended after the restore says so as the table does
            for how, step in re.findall(rf"^\[tune\] trial {r['trial_id']} (finished|stopped early by the "
                                        r"scheduler): step (\d+)", resumed.stdout, re.M):
                assert (how == "finished") == (r["finished"] == "True") and step == r["step"], (how, r)
        assert full
        summary = json.loads((base / "sweep_results.json").read_text())
        assert summary["best"]["valid_loss"] == min(float(r["valid_loss"]) for r in full)
        assert (base / "sweep_results.md").exists() and (base / "sweep_curves.png").exists()

        # the best config is a plain run config: the KI student with the best values and the sweep's teacher
        best = load_config(base / "best_config.yaml")
        assert best.data.domains[0].teacher.path == str(base / "sw-teacher")
        assert best.data.domains[0].teacher.steps == int(summary["best_params"]["ki.inherit.steps"])
        assert best.train.lr == pytest.approx(float(summary["best_params"]["train.lr"]))
        run = cli("run", str(base / "best_config.yaml"), timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        res = json.loads((base / "sw-best" / "results.json").read_text())
        assert res["stages"][0]["teacher_flops"] > 0  # it distilled from the sweep's teacher


@pytest.mark.timeout(1200)
def test_pbt_clones_the_better_trial_between_segments(demo_corpus, tmp_path):
    out = tmp_path / "pbt"
    overrides = [o for o in sweep_overrides(demo_corpus, out) if not o.startswith("tune.space=")] + [
        "run_name=pbt",
        "tune.scheduler=pbt",
        "tune.quantile_fraction=0.5",
        "tune.perturbation_interval=4",
        "data.pretokenize=true",
        # two very different learning rates: the slow trial is the one cloned over at the boundary
        "tune.space={train.lr: {choice: [1.0e-5, 3.0e-3]}, ki.inherit.alpha0: {uniform: [0.2, 0.8]}}",
    ]
    done = cli("tune", str(REPO / "configs/tune_ki.yaml"), *overrides, timeout=1100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    base = out / "pbt"
    with open(base / "sweep_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["finished"] == "True" and int(r["step"]) == 8 for r in rows), rows
    for r in rows:  # two segments, each its own Ray Train run continuing the last one's checkpoint
        ckpts = base / "trials" / r["trial_id"] / "checkpoints"
        assert {p.name.rsplit("-", 1)[-1] for p in ckpts.iterdir() if p.is_dir()} == {"seg0", "seg1"}
    assert len({r["trial_id"] for r in rows}) == 2
    policy = list((base / "tune").glob("pbt_policy_*.txt"))
    # one line per clone: (target tag, source tag, ..., old, new config)
    assert policy, "PBT exploited no trial"
    target, source = json.loads(policy[0].read_text().splitlines()[0])[:2]
    assert target != source
    ids = sorted(r["trial_id"] for r in rows)  # tags start with the trial's index
    t_id, s_id = ids[int(target.split("_")[0])], ids[int(source.split("_")[0])]
    hist = {
        i: json.loads((base / "trials" / i / "results.json").read_text())["stages"][0]["history"]
        for i in (t_id, s_id)
    }
    # the cloned-over trial's segment 1 continued the other's segment 0: their first 4 steps are the same
    assert [h for h in hist[t_id] if h["step"] <= 4] == [h for h in hist[s_id] if h["step"] <= 4]
    # the console: Tune's tables and per-trial boxes off, a line per trial event, and the lines that the two
    # trials print at once each naming its trial
    assert "Trial status" not in done.stdout and "started with configuration" not in done.stdout
    for r in rows:
        assert re.search(rf"^\[tune\] trial {r['trial_id']} starts: .*train\.lr=", done.stdout, re.M)
        assert re.search(rf"^\[tune\] trial {r['trial_id']} finished: step 8, valid_loss ", done.stdout, re.M)
        assert f"[stage {r['trial_id']}/00-sports-seg1] step 8/8 " in done.stdout, done.stdout[-3000:]
    assert f"[pbt] {t_id}: segment 1 continues " in done.stdout
    # data.pretokenize: the teacher's run packed the domain once into the sweep's packed_path, and every
    # trial segment streamed those rows (same key: no second packing, no leftover)
    assert "[data] packing domain 'sports'" in done.stdout
    assert [p.name[:10] for p in (base / "packed").iterdir()] == ["00-sports-"]
