"""A run's metrics where people look for them: TensorBoard event files, and MLflow when configured.

The driver logs each stage when it finishes, from the stage's record (the same numbers as
``results.json``): every logged step's loss, learning rate, inheritance rate (KI) and tokens/s, on one
step axis for the whole run (the warmup's steps before its domain's); the stage's perplexity on every
domain, AP and AP+ so far; growth as the parameter count. Written by the driver and not by a worker,
the files land in the run directory whatever node trained the stage.

``logging.tensorboard`` (on by default) writes ``<run dir>/tensorboard/``; ``logging.mlflow`` names a
tracking URI. A resumed run logs only the stages it runs, and keeps its MLflow run (its id is kept in
the run directory).
"""

from __future__ import annotations

from ray_lifelong.config.schema import LifelongConfig
from ray_lifelong.eval.metrics import average_increased_perplexity, average_perplexity
from ray_lifelong.layout import run_layout
from ray_lifelong.stage.spec import StageResult

STEP_KEYS = {"loss": "train/loss", "lr": "train/lr", "alpha": "train/alpha",
             "tokens_per_s": "train/tokens_per_s"}


def stage_metrics(res: StageResult, first_step: int) -> list[tuple[int, str, float]]:
    """``(run step, name, value)`` of every logged step of a stage (its warmup first), the run step of
    the stage's step ``s`` being ``first_step + s`` (after the warmup's steps)."""
    out = []
    offset = first_step
    for phase in ([res.frw] if res.frw else []) + [res]:
        for rec in phase.history:
            for key, name in STEP_KEYS.items():
                if rec.get(key) is not None:
                    out.append((offset + rec["step"], name, float(rec[key])))
        offset += phase.steps
    return out


def stage_summary(matrix: list[list[float]], domains: list[str], res: StageResult) -> dict[str, float]:
    """The stage's end-of-stage figures: perplexity per domain, AP and AP+ over the stages so far, and the
    model's parameters (a growth shows as a step)."""
    row = matrix[-1]
    out = {f"ppl/{d}": v for d, v in zip(domains, row)}
    out["AP"] = average_perplexity(matrix, geometric=True)[-1]
    if len(matrix) > 1:
        out["AP_plus"] = average_increased_perplexity(matrix)[-1]
    growth = (res.frw.growth if res.frw else None) or res.growth
    if growth:
        out["params"] = float(growth["params_after"])
    return out


class RunTracker:
    """Writes one run's metrics to TensorBoard and MLflow (each optional)."""

    def __init__(self, cfg: LifelongConfig) -> None:
        self.cfg = cfg
        lay = run_layout(cfg)
        self.tb = self.mlflow = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(lay.tensorboard))
        if cfg.logging.mlflow:
            import mlflow

            mlflow.set_tracking_uri(cfg.logging.mlflow)
            mlflow.set_experiment(cfg.logging.mlflow_experiment)
            known = lay.mlflow_run_id.read_text().strip() if lay.mlflow_run_id.exists() else None
            run = mlflow.start_run(run_id=known, run_name=None if known else cfg.run_name)
            lay.mlflow_run_id.write_text(run.info.run_id)
            if not known:
                mlflow.log_params({"arch": cfg.model.arch, "steps": cfg.train.steps, "lr": cfg.train.lr,
                                   "domains": ",".join(d.name for d in cfg.data.domains),
                                   "batch_size": cfg.train.batch_size, "seed": cfg.train.seed})
            self.mlflow = mlflow

    def stage(self, res: StageResult, first_step: int, matrix: list[list[float]], domains: list[str]) -> None:
        """Log a stage that finished in this invocation; ``first_step``: the run step it starts after."""
        points = stage_metrics(res, first_step)
        last = first_step + res.steps + (res.frw.steps if res.frw else 0)
        summary = stage_summary(matrix, domains, res)
        if self.tb is not None:
            for step, name, value in points:
                self.tb.add_scalar(name, value, step)
            for name, value in summary.items():
                self.tb.add_scalar(f"stage/{name}", value, last)
            self.tb.add_text("stages", f"stage {res.index} ({res.domain}) done at run step {last}", last)
            self.tb.flush()
        if self.mlflow is not None:
            by_step: dict[int, dict[str, float]] = {}
            for step, name, value in points:
                by_step.setdefault(step, {})[name] = value
            for step, metrics in by_step.items():
                self.mlflow.log_metrics(metrics, step=step)
            self.mlflow.log_metrics({f"stage/{k}": v for k, v in summary.items()}, step=last)

    def initial(self, ppl: dict[str, float]) -> None:
        """The starting checkpoint's perplexity on every domain (``model.init_from``), at run step 0."""
        if self.tb is not None:
            for d, v in ppl.items():
                self.tb.add_scalar(f"stage/ppl/{d}", v, 0)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({f"stage/ppl/{d}": v for d, v in ppl.items()}, step=0)

    def close(self, results_path=None) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            if results_path is not None:
                self.mlflow.log_artifact(str(results_path))
            self.mlflow.end_run()
