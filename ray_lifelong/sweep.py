"""``ray-lifelong tune``: Ray Tune sweeps over any config field, each trial a real staged run on Ray Train.

A sweep is a lifelong config plus a ``tune:`` section (:class:`SweepConfig`): a search space over dotted
config paths, a scheduler (ASHA, FIFO or PBT), a search algorithm (random/grid or Optuna) and the trials'
resources. Each trial is a Tune *function trainable* that runs :func:`run_lifelong` on the config with
its sampled values (Ray Train V2 inside a Tune trial); every validation of every stage is
forwarded to Tune as one iteration, so ASHA can stop a poor trial between evaluations. Under PBT a trial
runs its one stage in segments (:func:`_pbt_trial`) and reports a Tune checkpoint after each, which PBT
clones into the worst trials.

Layout under ``<output_dir>/<run_name>/``: ``tokenizer/``, the KI teacher's run (``tune.base: ki``),
``trials/<trial_id>/`` (each trial's own run directory), ``tune/`` (Tune's state, unless
``tune.storage_path``), and the results: ``sweep_results.csv``, ``sweep_results.md``, ``best_config.yaml``
(accepted by ``ray-lifelong run``) and ``sweep_curves.png``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ray_lifelong.config import ConfigError, LifelongConfig, to_yaml, validate, with_values
from ray_lifelong.config.plan import stage_plans
from ray_lifelong.config.schema import SearchDim
from ray_lifelong.data.demo import prepare_demo
from ray_lifelong.data.run_tokenizer import prepare_tokenizer
from ray_lifelong.data.sources import join_uri
from ray_lifelong.data.stream import StreamOptions, bad_record_log, quiet_ray_data, validation_rows
from ray_lifelong.ki import variants
from ray_lifelong.layout import run_layout
from ray_lifelong.pipeline import prepare_start, results_summary, run_lifelong
from ray_lifelong.stage.run import run_stage
from ray_lifelong.stage.spec import StageSpec, read_tokenizer_files

TRIALS = "trials"


# ------------------------------------------------------------------------------------------ pure parts

def dimension(dim: SearchDim):
    """The Ray Tune domain of one configured dimension."""
    from ray import tune

    if dim.choice is not None:
        return tune.choice(list(dim.choice))
    if dim.grid is not None:
        return tune.grid_search(list(dim.grid))
    if dim.uniform is not None:
        return tune.uniform(*dim.uniform)
    if dim.loguniform is not None:
        return tune.loguniform(*dim.loguniform)
    if dim.randint is not None:
        return tune.randint(*dim.randint)
    raise ConfigError("a search dimension sets none of choice, grid, uniform, loguniform, randint")


def edge_values(dim: SearchDim) -> list:
    """The values a dimension can take at its edges: every choice, or both ends of a range."""
    if dim.choice is not None or dim.grid is not None:
        return list(dim.choice if dim.choice is not None else dim.grid)
    if dim.randint is not None:
        return [dim.randint[0], dim.randint[1] - 1]  # randint's high end is exclusive
    return list(dim.uniform if dim.uniform is not None else dim.loguniform)


def check_space(cfg: LifelongConfig, where: str = "<config>") -> None:
    """Every searched path must be a config field that accepts the dimension's values (checked at
    both ends of ranges): a typo fails here, before any trial starts."""
    if not cfg.tune.space:
        raise ConfigError(f"{where}: tune.space is empty: name at least one config field to search")
    for path, dim in cfg.tune.space.items():
        vals = edge_values(dim)
        for v in vals:  # the trial's own config, so that KI's inherit values are checked as the student's
            c = trial_config(
                cfg,
                {path: v},
                run_name="check",
                output_dir=cfg.output_dir,
                tokenizer_dir="<tokenizer>",
                teacher_dir="<teacher>",
                where=f"{where}: tune.space",
            )
            validate(c, f"{where}: tune.space.{path}={v!r}")


def absolute_paths(cfg: LifelongConfig) -> LifelongConfig:
    """A copy with every local path made absolute (URIs kept): Tune runs each trial in its own working
    directory, and on a cluster the driver's relative paths mean nothing to a trial on another node."""
    import copy
    import os

    def fix(p):
        return p if p is None or "://" in p or os.path.isabs(p) else os.path.abspath(p)

    c = copy.deepcopy(cfg)
    c.output_dir, c.demo.dir, c.tokenizer.path = fix(c.output_dir), fix(c.demo.dir), fix(c.tokenizer.path)
    c.model.init_from = fix(c.model.init_from)
    c.ray.storage_path, c.tune.storage_path = fix(c.ray.storage_path), fix(c.tune.storage_path)
    c.continual.replay.memory_path, c.data.packed_path = (
        fix(c.continual.replay.memory_path),
        fix(c.data.packed_path),
    )
    for dom in c.data.domains:
        dom.train, dom.valid = [fix(p) for p in dom.train], [fix(p) for p in dom.valid]
        if dom.teacher is not None:
            dom.teacher.path = fix(dom.teacher.path)
            dom.teacher.per_domain = {k: fix(v) for k, v in dom.teacher.per_domain.items()}
    return c


def max_reports(cfg: LifelongConfig) -> int:
    """Validations a trial reports: one per ``eval_every`` steps of each stage, the last at its end."""
    every = cfg.train.eval_every or 0
    return sum(math.ceil(p.steps / every) if every else 1 for p in stage_plans(cfg))


def trial_demand(cfg: LifelongConfig) -> dict[str, float]:
    """What one trial holds while it trains: CPUs for its driver, its Ray Train workers and its data
    pipeline (a read task and the tokenizer actors, which run beside the workers for the whole stage), and
    GPUs for its workers (of its largest stage, where domains set their own ``scaling``)."""
    d = cfg.data
    stages = [dom.scaling or cfg.scaling for dom in d.domains] or [cfg.scaling]
    # packed rows: reads only
    tokenize = 0.0 if d.pretokenize else max(1, d.tokenize_actors) * d.tokenize_num_cpus
    return {
        "driver": cfg.tune.trial_cpus,
        "workers": max(s.num_workers * s.cpus_per_worker for s in stages),
        "data": d.read_num_cpus + tokenize,
        "gpus": max(s.num_workers * s.gpus_per_worker if s.use_gpu else 0.0 for s in stages),
    }


def trials_that_fit(demand: dict[str, float], cpus: float, gpus: float) -> int:
    """How many trials of ``demand`` the cluster's ``cpus`` and ``gpus`` hold at once."""
    eps = 1e-9  # 2 CPUs hold two trials of 1.0 even when the parts add up to 1.0000000000000002
    n = math.floor(cpus / (demand["driver"] + demand["workers"] + demand["data"]) + eps)
    if demand["gpus"] > 0:
        n = min(n, math.floor(gpus / demand["gpus"] + eps))
    return n


def concurrency(cfg: LifelongConfig, cpus: float, gpus: float, where: str = "<config>") -> int:
    """The trials to run at once: ``tune.max_concurrent_trials``, lowered (and said so) to what the cluster
    holds with each trial's workers *and* data pipeline. More trials than that would start their workers
    and leave their data tasks no CPU: every trial waits for a first batch for ever.

    Raises:
        ConfigError: not even one trial fits, or PBT (whose trials must all run together) does not fit.
    """
    tu = cfg.tune
    want = tu.max_concurrent_trials
    if not tu.fit_to_cluster:
        return want
    d = trial_demand(cfg)
    per = d["driver"] + d["workers"] + d["data"]
    parts = (
        f"{per:g} CPUs (driver {d['driver']:g} tune.trial_cpus, workers {d['workers']:g} scaling.*, data "
        f"{d['data']:g} data.read_num_cpus/tokenize_*)" + (f" and {d['gpus']:g} GPUs" if d["gpus"] else "")
    )
    have = f"the cluster has {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if d["gpus"] else "")
    fit = trials_that_fit(d, cpus, gpus)
    if fit < 1:
        raise ConfigError(
            f"{where}: one trial needs {parts} but {have}: lower those keys or add nodes "
            f"(tune.fit_to_cluster=false on a cluster that autoscales)"
        )
    if tu.scheduler == "pbt" and fit < tu.num_samples:
        raise ConfigError(
            f"{where}: tune.scheduler=pbt runs its {tu.num_samples} trials together, each needing {parts}, "
            f"but {have} ({fit} fit): lower tune.num_samples or the trial's resources"
        )
    if fit < want:
        print(
            f"[tune] running {fit} trials at a time, not tune.max_concurrent_trials={want}: each needs "
            f"{parts} and {have}",
            flush=True,
        )
    return min(fit, want)


# ------------------------------------------------------------------------------------------ the trial


def trial_config(
    cfg: LifelongConfig,
    params: dict,
    *,
    run_name: str,
    output_dir: str,
    tokenizer_dir: str,
    teacher_dir: str | None,
    where: str = "trial",
) -> LifelongConfig:
    """The run one trial trains: the base config with the sampled values, its own run directory, the
    sweep's tokenizer and (``tune.base: ki``) the KI student distilling from the sweep's teacher."""
    c = with_values(cfg, params, where)
    if cfg.tune.base == "ki":
        c = variants(c, tokenizer_dir)["ki"]
        for d in c.data.domains:
            d.teacher.path = teacher_dir
    c.run_name, c.output_dir = run_name, output_dir
    c.tokenizer.path = tokenizer_dir
    c.demo.enabled = False  # the driver wrote the demo data once
    c.tune.space = {}
    return c


def _callback(metric: str, last_stage: int):
    """A Train callback that forwards each validation (the reports that carry ``metric``) to Tune.

    Checkpoint-only reports are not iterations (ASHA would see a result without its metric). The last
    stage's final report is held back: the trial reports it itself once the run has written its results
    and final model, so that a scheduler's stop at that report cannot cut the run short.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0] if metrics else {}
            if metric in m and not (m.get("final") and m.get("stage") == last_stage):
                super().after_report(run_context, metrics, checkpoint)

    return ValidationToTune()


def _trial(
    params: dict, *, cfg: LifelongConfig, tokenizer_dir: str, teacher_dir: str | None, trials_dir: str
) -> None:
    from ray import tune

    # the trial id names the run: a restored sweep finds the trial's finished stages and checkpoints
    run_name = tune.get_context().get_trial_id()
    c = trial_config(
        cfg,
        params["params"],
        run_name=run_name,
        output_dir=trials_dir,
        tokenizer_dir=tokenizer_dir,
        teacher_dir=teacher_dir,
    )
    last = len(c.data.domains) - 1
    summary = run_lifelong(c, resume=True, callbacks=[_callback(cfg.tune.metric, last)], trial=run_name)
    ppl = summary["ppl_matrix"][-1]
    tune.report(
        {
            "valid_loss": math.log(ppl[last]),
            "stage": last,
            "step": summary["stages"][-1]["steps"],
            "final": True,
            **{f"ppl/{d}": p for d, p in zip(summary["domains"], ppl)},
        }
    )


def segment_ends(steps: int, interval: int) -> list[int]:
    """PBT: the steps at which a stage's segments end (the last one at ``steps``)."""
    return sorted({min(steps, k) for k in range(interval, steps + interval, interval)})


def pbt_interval(cfg: LifelongConfig) -> int:
    steps = stage_plans(cfg)[0].steps
    return cfg.tune.perturbation_interval or cfg.train.eval_every or max(1, steps // 4)


def _pbt_trial(
    params: dict, *, cfg: LifelongConfig, tokenizer_dir: str, teacher_dir: str | None, trials_dir: str
) -> None:
    """A PBT trial: the one stage in segments, each its own Ray Train run continuing the last segment's
    checkpoint. The Tune checkpoint after a segment is a pointer to that Train checkpoint, so a trial that
    PBT makes clone another continues from the other's weights, optimizer and data position, with the
    values PBT gave it (``params`` then holds the perturbed ones)."""
    import tempfile

    import ray.train
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    c = trial_config(
        cfg,
        params["params"],
        run_name=trial_id,
        output_dir=trials_dir,
        tokenizer_dir=tokenizer_dir,
        teacher_dir=teacher_dir,
    )
    lay = run_layout(c)
    lay.root.mkdir(parents=True, exist_ok=True)
    dom, plan = c.data.domains[0], stage_plans(c)[0]
    ends = segment_ends(plan.steps, pbt_interval(c))
    start, resume_from = 0, None
    pointer = tune.get_checkpoint()
    if pointer is not None:  # after a pause, a clone or a restored sweep
        with pointer.as_directory() as d:
            last = json.loads((Path(d) / "segment.json").read_text())
        start, resume_from = last["segment"] + 1, ray.train.Checkpoint(last["checkpoint"])
        print(f"[pbt] {trial_id}: segment {start} continues {last['checkpoint']} ({last['trial_id']})")
    quiet_ray_data()  # this trial's process builds its stream's dataset, as a run's driver does
    log = bad_record_log(c.data.on_bad_record)
    valid = validation_rows(c.data.domains, StreamOptions(tokenizer_dir, c.model.arch, c.data), log)
    init = prepare_start(c)[1]  # model.init_from's model for the first segment (None: a fresh one)
    for k in range(start, len(ends)):
        spec = StageSpec(
            cfg=c,
            index=0,
            domain=dom.name,
            eval_domains=[dom.name],
            steps=plan.steps,
            batch_size=plan.batch_size,
            lr=plan.lr,
            schedule=plan.schedule,
            tokenizer_files=read_tokenizer_files(tokenizer_dir),
            init_checkpoint=init,
            segment=k,
            resume_from=resume_from,
            stop_at=ends[k],
            trial=trial_id,
        )
        res = run_stage(
            spec, tokenizer_dir=tokenizer_dir, storage_path=lay.storage, valid=valid, bad_log=log
        )
        resume_from = ray.train.Checkpoint(res.checkpoint_path)
        final = k == len(ends) - 1
        if final:  # the trial ran to the end: the same results.json as a run's
            lay.results.write_text(json.dumps(results_summary([dom.name], [res]), indent=1))
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "segment.json").write_text(
                json.dumps(
                    {"segment": k, "checkpoint": res.checkpoint_path, "trial_id": trial_id, "step": res.steps}
                )
            )
            tune.report(
                {
                    "valid_loss": math.log(res.ppl[dom.name]),
                    "stage": 0,
                    "step": res.steps,
                    "segment": k,
                    "final": final,
                    f"ppl/{dom.name}": res.ppl[dom.name],
                    # the last segment ends the trial here: PBT would otherwise pause it at this boundary
                    # too and restart it, cloned or not, only for it to find no segment left
                    "done": final,
                },
                checkpoint=tune.Checkpoint.from_directory(d),
            )


def _scheduler(cfg: LifelongConfig, reports: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    tu = cfg.tune
    if tu.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=reports,
            grace_period=tu.grace_period,
            reduction_factor=tu.reduction_factor,
        )
    if tu.scheduler == "pbt":  # one iteration per segment; synchronous, so every boundary compares all trials
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=1,
            synch=True,
            hyperparam_mutations={"params": {p: dimension(d) for p, d in tu.space.items()}},
            quantile_fraction=tu.quantile_fraction,
            resample_probability=tu.resample_probability,
        )
    return FIFOScheduler()


# ------------------------------------------------------------------------------------------ the sweep


def tune_storage(cfg: LifelongConfig) -> str:
    """Ray Tune's storage: ``tune.storage_path`` (made absolute) or else the run directory."""
    return absolute_paths(cfg).tune.storage_path or str(run_layout(cfg).root)


def experiment_path(cfg: LifelongConfig) -> str:
    """Where Ray Tune keeps the sweep's state: ``<storage root>/tune``."""
    return join_uri(tune_storage(cfg), "tune")


def check_sweep_start(cfg: LifelongConfig, resume: bool, where: str = "<config>") -> None:
    """Refuse to start a new sweep over an existing one unless resuming: before anything is trained (the
    shared teacher) and, from the CLI, before Ray starts."""
    from ray import tune

    exp_path = experiment_path(cfg)
    if not resume and tune.Tuner.can_restore(exp_path):
        raise ConfigError(
            f"{where}: a sweep already exists in {exp_path}: pass --resume to finish it, or "
            f"choose another run_name=/tune.storage_path="
        )


def trials_in_sweep(cfg: LifelongConfig) -> int:
    """How many trials the sweep runs: ``num_samples`` of each combination of the grid dimensions."""
    grids = [len(d.grid) for d in cfg.tune.space.values() if d.grid is not None]
    return cfg.tune.num_samples * math.prod(grids)


def finished_sweep(cfg: LifelongConfig):
    """The results (a Tune ``ResultGrid``) of ``cfg``'s sweep if every one of its trials has ended, read
    from the sweep's storage without Ray; None while a trial is left to run, has failed (``--resume`` runs
    it again) or was never started."""
    from ray import tune
    from ray.tune import ExperimentAnalysis, ResultGrid

    exp_path = experiment_path(cfg)
    if not tune.Tuner.can_restore(exp_path):
        return None
    analysis = ExperimentAnalysis(exp_path)
    ended = [t for t in analysis.trials if t.status == "TERMINATED"]
    if len(ended) < trials_in_sweep(cfg) or len(ended) < len(analysis.trials):
        return None
    return ResultGrid(analysis)


def run_sweep(
    cfg: LifelongConfig, *, resume: bool = False, where: str = "<config>", verbose: bool = False,
    start_ray=None,
) -> dict:
    """Run (or, with ``resume``, restore and finish) the sweep of ``cfg``; write and return the results.
    ``verbose``: Tune's own console (a restored sweep keeps the console it was started with).
    ``start_ray``: called once it is known that a trial is left to run (the command line's session): a
    finished sweep's ``--resume`` rewrites its results from storage without starting Ray."""
    import warnings

    import ray
    from ray import tune

    if not verbose:  # Tune's advice for class trainables; these trials are functions, each its own run
        warnings.filterwarnings("ignore", message="Consider boosting PBT performance")

    check_space(cfg, where)
    check_sweep_start(cfg, resume, where)
    done = finished_sweep(cfg) if resume else None
    if done is not None:
        cfg, base, tok_dir, teacher_cfg = _sweep_inputs(cfg)
        print(f"[tune] every trial of the sweep in {experiment_path(cfg)} has ended: its results are written "
              f"again from there")
        teacher_dir = str(run_layout(teacher_cfg).root) if teacher_cfg else None
        return write_sweep_results(cfg, done, base, tokenizer_dir=tok_dir, teacher_dir=teacher_dir)
    if start_ray is not None:
        start_ray()
    resources = ray.cluster_resources()
    limit = concurrency(cfg, resources.get("CPU", 0.0), resources.get("GPU", 0.0), where)
    cfg, base, tok_dir, teacher_cfg = _sweep_inputs(cfg)
    tu = cfg.tune
    teacher_dir = None
    if teacher_cfg is not None:  # one teacher for every trial, trained first (or found finished)
        teacher = run_layout(teacher_cfg)
        teacher_dir = str(teacher.root)
        if teacher.results.exists():
            print(f"[tune] teacher already trained: {teacher_dir}")
        else:
            print(f"[tune] training the KI teacher once for every trial: {teacher_dir}")
            run_lifelong(teacher_cfg, resume=True)

    trainable = tune.with_resources(
        tune.with_parameters(
            _pbt_trial if tu.scheduler == "pbt" else _trial,
            cfg=cfg,
            tokenizer_dir=tok_dir,
            teacher_dir=teacher_dir,
            trials_dir=str(base / TRIALS),
        ),
        {"cpu": tu.trial_cpus},
    )
    storage = tune_storage(cfg)
    exp_path = join_uri(storage, "tune")
    if resume and tune.Tuner.can_restore(exp_path):
        print(f"[tune] restoring the sweep in {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        reports = max_reports(
            trial_config(
                cfg,
                {},
                run_name="probe",
                output_dir=str(base),
                tokenizer_dir=tok_dir,
                teacher_dir=teacher_dir,
            )
        )
        tuner = new_tuner(cfg, trainable, reports=reports, max_concurrent=limit, storage=storage,
                          verbose=verbose)
    grid = tuner.fit()
    return write_sweep_results(cfg, grid, base, tokenizer_dir=tok_dir, teacher_dir=teacher_dir)


def _sweep_inputs(cfg: LifelongConfig):
    """``cfg`` with absolute paths, the sweep's directory, its tokenizer (made once) and, for a KI sweep,
    the config of the teacher that every trial distils from (None otherwise)."""
    cfg = absolute_paths(cfg)
    base = run_layout(cfg).root
    base.mkdir(parents=True, exist_ok=True)
    if cfg.data.pretokenize and not cfg.data.packed_path:  # every trial (and the teacher) reads one packing
        cfg.data.packed_path = str(base / "packed")
    prepare_demo(cfg)
    tok_dir = prepare_tokenizer(cfg, base / "tokenizer")
    teacher_cfg = None
    if cfg.tune.base == "ki":
        teacher_cfg = variants(cfg, tok_dir)["teacher"]
        teacher_cfg.tune.space = {}
    return cfg, base, tok_dir, teacher_cfg


def trial_lines(metric: str, last_stage: int):
    """A Tune callback that says each trial's events in one line of the project's own (``[tune] ...``):
    its start with its values, each validation it reports, its end, and whether it finished its stages or
    the scheduler stopped it. It stands in for Tune's status tables and per-trial boxes, which a sweep
    prints only under ``--verbose``.

    A trial finished when its last result is its own final report of the last stage (``final`` at stage
    ``last_stage``): Tune marks a trial's last result ``done`` alike when the trial returned and when a
    scheduler stopped it."""
    from ray import tune

    def values(trial) -> str:
        params = (trial.config or {}).get("params", {})
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())

    def at(result: dict) -> str:
        v, step = result.get(metric), result.get("step")
        return (f"step {step}, " if step is not None else "") + (
            f"{metric} {v:.4f}" if isinstance(v, (int, float)) else f"no {metric}")

    class TrialLines(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"[tune] trial {trial.trial_id} starts: {values(trial)}", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            print(f"[tune] trial {trial.trial_id}: {at(result)}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            done = last.get("final") and last.get("stage") == last_stage
            how = "finished" if done else "stopped early by the scheduler"
            print(f"[tune] trial {trial.trial_id} {how}: {at(last)}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[tune] trial {trial.trial_id} failed (error in {trial.error_file or trial.local_path})",
                  flush=True)

    return TrialLines()


def new_tuner(cfg: LifelongConfig, trainable, *, reports: int, max_concurrent: int, storage: str,
              verbose: bool = False):
    """The sweep's ``tune.Tuner`` over ``trainable``: the config's space, scheduler and search, at most
    ``max_concurrent`` trials at a time, its experiment at ``<storage>/tune``; Tune's own console (status
    tables, a box per trial) only when ``verbose``, else one line per trial event (:func:`trial_lines`)."""
    from ray import tune

    tu = cfg.tune
    return tune.Tuner(
        trainable,
        param_space={"params": {path: dimension(dim) for path, dim in tu.space.items()}},
        tune_config=tune.TuneConfig(
            metric=tu.metric,
            mode=tu.mode,
            scheduler=_scheduler(cfg, reports),
            search_alg=_searcher(tu, max_concurrent),
            num_samples=tu.num_samples,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
            verbose=None if verbose else 0,
            callbacks=None if verbose else [trial_lines(tu.metric, len(cfg.data.domains) - 1)],
        ),
    )


def _searcher(tu, max_concurrent: int):
    """The search algorithm, holding the concurrency limit itself: Tune ignores ``max_concurrent_trials``
    for a variant generator (it only wraps a ``Searcher``) and would start every sample at once."""
    if tu.search == "random":  # random samples (reproducible with tune.seed), grid dimensions expanded
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=tu.seed, max_concurrent=max_concurrent)
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError(
            "tune.search=optuna needs the optuna package (pip install optuna, or the [tune] extra)"
        ) from None
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaSearch(seed=tu.seed), max_concurrent=max_concurrent)


def write_sweep_results(
    cfg: LifelongConfig, grid, base: Path, *, tokenizer_dir: str, teacher_dir: str | None
) -> dict:
    """Every trial's values and metrics (CSV, Markdown), the best config as a runnable YAML, the curves."""
    tu = cfg.tune
    paths = list(tu.space)
    rows, curves = [], {}
    for result in grid:
        m = result.metrics or {}
        trial_id = _trial_id(result.path) or m.get("trial_id")
        history = result.metrics_dataframe
        values = history[tu.metric].dropna().tolist() if history is not None and tu.metric in history else []
        curves[trial_id] = values
        best_seen = (min(values) if tu.mode == "min" else max(values)) if values else None
        error = _last_error_line(result.error) if result.error else ""
        # a trial's run writes results.json after its last stage: ASHA's stopped trials have none
        finished = (base / TRIALS / trial_id / "results.json").exists()
        rows.append(
            {
                "trial_id": trial_id,
                **{p: result.config["params"].get(p) for p in paths},
                tu.metric: m.get(tu.metric),
                f"best_{tu.metric}": best_seen,
                "stage": m.get("stage"),
                "step": m.get("step"),
                "evaluations": len(values),
                "finished": finished,
                "stopped_early": not finished and not error,
                "error": error,
            }
        )
    done = [r for r in rows if r["finished"] and r[tu.metric] is not None]
    if not done:
        errors = [r["error"] for r in rows if r["error"]]
        raise RuntimeError(
            f"no trial of the sweep ran to the end (see {base / 'tune'})"
            + (f"; first error: {errors[0]}" if errors else "")
        )
    # finished trials first, best first (ties by trial id); the best is the first one: among the trials that
    # ran to the end, since a stopped trial ends on an earlier, higher loss
    rows.sort(
        key=lambda r: (
            not r["finished"],
            r[tu.metric] is None,
            r[tu.metric] if tu.mode == "min" else -(r[tu.metric] or 0),
            r["trial_id"],
        )
    )
    best = rows[0]

    best_params = {p: best[p] for p in paths}
    best_cfg = trial_config(
        cfg,
        best_params,
        run_name=f"{cfg.run_name}-best",
        output_dir=str(base),
        tokenizer_dir=tokenizer_dir,
        teacher_dir=teacher_dir,
    )
    (base / "best_config.yaml").write_text(
        f"# best trial {best['trial_id']} of the sweep {base}: {tu.metric} {best[tu.metric]:.4f}\n"
        f"# ray-lifelong run {base / 'best_config.yaml'}\n" + to_yaml(best_cfg)
    )
    fields = list(rows[0])
    with open(base / "sweep_results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# Sweep {cfg.run_name}: {len(rows)} trials, {tu.scheduler}, {tu.search} search, "
        f"{tu.mode} {tu.metric}",
        "",
        "| " + " | ".join(fields) + " |",
        "|" + "---|" * len(fields),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in fields) + " |")
    lines += [
        "",
        f"Best (ran to the end): trial {best['trial_id']}, "
        + ", ".join(f"{p}={_fmt(v)}" for p, v in best_params.items())
        + f": {tu.metric} {best[tu.metric]:.4f}. "
        f"Run it: `ray-lifelong run {base / 'best_config.yaml'}`.",
        "",
        "![curves](sweep_curves.png)",
    ]
    (base / "sweep_results.md").write_text("\n".join(lines) + "\n")
    _plot(curves, best["trial_id"], tu.metric, base / "sweep_curves.png")
    summary = {
        "trials": rows,
        "best": best,
        "best_params": best_params,
        "best_config": str(base / "best_config.yaml"),
        "results_csv": str(base / "sweep_results.csv"),
    }
    (base / "sweep_results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"[tune] best trial {best['trial_id']}: {best_params} -> {tu.metric} {best[tu.metric]:.4f}")
    print(f"[tune] results: {base / 'sweep_results.md'}, best config: {base / 'best_config.yaml'}")
    return summary


def _trial_id(path: str) -> str | None:
    """The trial id (``<experiment>_<index>``) in a Tune trial directory's name. A PBT clone's last result
    can carry the id of the trial it was cloned from, so the directory is the reliable source."""
    import re

    found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(path).name)
    return found.group(1) if found else None


def _last_error_line(error: BaseException) -> str:
    """The last line of the innermost error (Tune wraps the trial's exception in its own)."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "None" if v is None else str(v)


def _plot(curves: dict[str, list[float]], best: str, metric: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (the `plots` extra)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for trial, values in curves.items():
        ax.plot(
            range(1, len(values) + 1),
            values,
            marker="o",
            ms=3,
            lw=2.5 if trial == best else 1,
            label=trial + (" (best)" if trial == best else ""),
        )
    ax.set_xlabel("evaluation (Tune iteration)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
