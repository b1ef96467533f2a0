"""TensorBoard and MLflow logging of a run, read back with their own readers."""

from __future__ import annotations

import pytest

from ray_lifelong.config import load_config
from ray_lifelong.stage.spec import StageResult
from ray_lifelong.tracking import RunTracker, stage_metrics


def _stage(index: int, domain: str, steps: int, ppl: dict, frw_steps: int = 0) -> StageResult:
    hist = [{"step": s, "loss": 5.0 - 0.1 * s - index, "lr": 1e-3, "alpha": 0.0, "tokens_per_s": 100.0 + s}
            for s in range(2, steps + 1, 2)]
    res = StageResult(index=index, domain=domain, checkpoint_path="", ppl=ppl, steps=steps, tokens=0,
                      train_flops=0.0, wall_time_s=1.0, history=hist)
    if frw_steps:
        res.frw = StageResult(index=index, domain=domain, checkpoint_path="", ppl=ppl, steps=frw_steps,
                              tokens=0, train_flops=0.0, wall_time_s=1.0, phase="frw",
                              history=[{"step": frw_steps, "loss": 9.0, "lr": 2e-3}],
                              growth={"params_before": 10, "params_after": 20})
    return res


def test_a_stages_steps_follow_the_run_steps_before_it_with_its_warmup_first():
    pts = stage_metrics(_stage(1, "b", 4, {}, frw_steps=3), first_step=10)
    losses = [(s, v) for s, n, v in pts if n == "train/loss"]
    assert losses == [(13, 9.0), (15, 5.0 - 0.2 - 1), (17, 5.0 - 0.4 - 1)]


@pytest.fixture
def two_stages(tmp_path):
    # a real MLflow store in a local database: no server
    store = f"logging.mlflow=sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, [f"output_dir={tmp_path}", "run_name=t", store])
    tracker = RunTracker(cfg)
    names = ["a", "b"]
    s0 = _stage(0, "a", 6, {"a": 20.0, "b": 400.0})
    s1 = _stage(1, "b", 6, {"a": 30.0, "b": 25.0}, frw_steps=2)
    tracker.stage(s0, 0, [[20.0, 400.0]], names)
    tracker.stage(s1, 6, [[20.0, 400.0], [30.0, 25.0]], names)
    tracker.close()
    return tmp_path / "t", cfg


def test_tensorboard_events_load_in_tensorboards_own_reader(two_stages):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = two_stages
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    loss = [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == [2, 4, 6, 8, 10, 12, 14]  # stage 1's warmup at 8, its steps after
    assert loss[3] == (8, 9.0)
    assert [(e.step, e.value) for e in acc.Scalars("stage/ppl/b")] == [(6, 400.0), (14, 25.0)]
    assert [e.step for e in acc.Scalars("stage/AP_plus")] == [14]
    assert [e.value for e in acc.Scalars("stage/params")] == [20.0]


def test_the_mlflow_run_reads_back_with_mlflows_client_and_a_resume_keeps_it(two_stages):
    from mlflow.tracking import MlflowClient

    run_dir, cfg = two_stages
    run_id = (run_dir / "mlflow_run_id").read_text()
    client = MlflowClient(tracking_uri=cfg.logging.mlflow)
    run = client.get_run(run_id)
    assert run.data.params["arch"] == cfg.model.arch and run.info.run_name == "t"
    hist = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in hist) == [2, 4, 6, 8, 10, 12, 14]
    assert client.get_metric_history(run_id, "stage/ppl/a")[-1].value == 30.0
    again = RunTracker(cfg)  # a resumed run logs into the same MLflow run
    matrix = [[20.0, 400.0, 9.0], [30.0, 25.0, 9.0], [1.0, 2.0, 3.0]]
    again.stage(_stage(2, "c", 2, {"a": 1.0, "b": 2.0, "c": 3.0}), 14, matrix, ["a", "b", "c"])
    again.close()
    assert (run_dir / "mlflow_run_id").read_text() == run_id
    assert max(m.step for m in client.get_metric_history(run_id, "train/loss")) == 16
