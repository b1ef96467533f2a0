"""``ray-lifelong status``: a run's progress from its files."""

from __future__ import annotations

import json

import pytest

from ray_lifelong.cli import main
from ray_lifelong.config import load_config
from ray_lifelong.config.load import save_config
from ray_lifelong.layout import run_layout, stage_name
from ray_lifelong.status import run_status


def test_status_reads_done_stages_and_the_current_stages_newest_complete_checkpoint(tmp_path, capsys):
    doms = "[{name: a, train: [x], valid: [x]}, {name: b, train: [x], valid: [x], steps: 30}]"
    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=r", f"data.domains={doms}",
                             "train.steps=20"])
    lay = run_layout(cfg)
    lay.root.mkdir(parents=True)
    save_config(cfg, lay.config)
    assert run_status(lay.root)["current"] == {"label": "00-a", "checkpoint": None}
    # both stages train in one Ray Train run (the same workers), named after the first
    run = lay.root / "checkpoints" / stage_name("r", 0, "a")
    (run / "checkpoint_2026-01-01_00-00-00.1").mkdir(parents=True)
    (run / "checkpoint_2026-01-01_00-00-00.1" / "state.json").write_text(
        json.dumps({"phase": "main", "step": 20, "stage": 0, "done": True}))
    # stage 0 finished but not yet recorded: stage 1, in the same run, has no checkpoint yet
    lay.stage_marker("00-a").parent.mkdir(parents=True)
    lay.stage_marker("00-a").write_text(json.dumps({"ppl": {"a": 12.5, "b": 80.0}, "wall_time_s": 33.0}))
    assert run_status(lay.root)["current"] == {"label": "01-b", "checkpoint": None}
    for name, stage, step in (("checkpoint_2026-01-01_00-00-00.1", 0, 20),
                              ("checkpoint_2026-01-01_00-00-01.1", 1, 10),
                              ("checkpoint_2026-01-01_00-00-02.1", 1, 20)):
        (run / name).mkdir(parents=True, exist_ok=True)
        hist = [{"step": step, "loss": 3.5 + stage, "lr": 1e-3, "tokens_per_s": 900.0}]
        (run / name / "state.json").write_text(json.dumps({"phase": "main", "step": step, "history": hist,
                                                           "stage": stage, "done": stage == 0}))
    (run / "checkpoint_2026-01-01_00-00-03.1").mkdir()  # being written: no state.json yet
    st = run_status(lay.root)
    assert [s["done"] for s in st["stages"]] == [True, False] and st["stages"][0]["ppl"] == 12.5
    assert st["current"]["label"] == "01-b" and st["current"]["step"] == 20
    assert st["current"]["last"] == {"loss": 4.5, "lr": 1e-3, "tokens_per_s": 900.0}
    assert main(["status", str(lay.root)]) == 0
    out = capsys.readouterr().out
    assert "[done] 00-a: 20 steps, PPL on its domain 12.50" in out and "01-b (main) at step 20" in out
    assert main(["status", str(tmp_path)]) == 2  # not a run directory: a user's mistake
    assert "no config.yaml" in capsys.readouterr().err


def test_status_of_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        run_status(tmp_path / "nope")


def test_the_stages_left_are_those_without_a_record(tmp_path):
    from ray_lifelong.pipeline import unfinished_stages

    doms = "[{name: a, train: [x], valid: [x]}, {name: b, train: [x], valid: [x]}]"
    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=r", f"data.domains={doms}"])
    lay = run_layout(cfg)
    assert unfinished_stages(cfg) == ["00-a", "01-b"]  # a new run
    lay.stage_marker("00-a").parent.mkdir(parents=True)
    lay.stage_marker("00-a").write_text("{}")
    (lay.stage_marker("01-b").parent).mkdir(parents=True)  # started, not recorded
    assert unfinished_stages(cfg) == ["01-b"]
    lay.stage_marker("01-b").write_text("{}")
    assert unfinished_stages(cfg) == []  # `run --resume` then starts no Ray
