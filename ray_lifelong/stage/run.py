"""Run one stage on Ray Train: the only place a ``TorchTrainer`` is built."""

from __future__ import annotations

import time

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig
from ray.train.torch import TorchTrainer

from ray_lifelong.config.schema import LifelongConfig
from ray_lifelong.data.memory import check_memories
from ray_lifelong.data.packed import training_rows
from ray_lifelong.data.sources import DataError, data_error_text, root_cause
from ray_lifelong.data.stream import StreamOptions, ValidationRows, quiet_ray_data
from ray_lifelong.data.tokenizer import load_tokenizer
from ray_lifelong.distill.teacher import check_teacher_compatible
from ray_lifelong.flops import sequence_flops
from ray_lifelong.layout import run_layout, stage_name
from ray_lifelong.models.build import find_model_dir
from ray_lifelong.stage.checkpoint import checkpoint_uri
from ray_lifelong.stage.loop import train_loop_per_worker
from ray_lifelong.stage.spec import StageResult, StageSpec


class StageFailedError(RuntimeError):
    """A stage that Ray Train could not finish; the message carries the root cause."""


def run_stage(spec: StageSpec, *, tokenizer_dir: str, storage_path: str, valid: ValidationRows, bad_log=None,
              train_ds=None, callbacks=None) -> StageResult:
    """Train ``spec.domain`` on Ray Train and evaluate every domain; return the stage record.

    Args:
        valid: the run's validation rows (:func:`validation_rows`).
        bad_log: a :class:`BadRecordLog` actor collecting skipped records.
        train_ds: the training stream (rows ``{input_ids, domain_id}``); ``None`` streams the domain's
            own training files.
        callbacks: Ray Train ``UserCallback``s of the stage's run (a Tune sweep forwards validations).
    """
    cfg: LifelongConfig = spec.cfg
    quiet_ray_data()
    opts = StreamOptions(tokenizer_dir=tokenizer_dir, arch=cfg.model.arch, data=cfg.data)
    index = {d.name: i for i, d in enumerate(cfg.data.domains)}
    teacher_cfgs = _prepare_teachers(spec, tokenizer_dir)
    if train_ds is None:  # the domain's own training rows (packed once under data.pretokenize)

        i = index[spec.domain]
        train_ds = training_rows([(i, cfg.data.domains[i])], opts, prompts=cfg.continual.prompts, log=bad_log,
                                 packed_root=run_layout(cfg).packed)
    check_memories(spec.replay_uris)  # read by the workers themselves: a missing one is said here
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "valid": valid},
        # a stage may take its own workers, e.g. more after growth
        scaling_config=ray_scaling(spec.domain_cfg.scaling or cfg.scaling),
        run_config=RunConfig(
            name=stage_name(cfg.run_name, spec.index, spec.domain, spec.segment),
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures,
                                         controller_failure_limit=cfg.ray.startup_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            logging_config=LoggingConfig(log_level="WARNING"), callbacks=callbacks),
        # validation rows and replay memories travel apart: every worker scores all validation rows (its
        # share by index) and draws replayed rows from the whole memory
        datasets={"train": train_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    t0, fit_started = time.perf_counter(), time.time()
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception several levels deep
        # bad input found while streaming is the user's to fix (the CLI's exit 2), not a failed stage
        bad_input = data_error_text(e)
        error = DataError if bad_input else StageFailedError
        raise error(f"stage {spec.index} ({spec.domain}) failed: {bad_input or root_cause(e)}") from e
    wall, fit_ended = time.perf_counter() - t0, time.time()
    out = result.return_value or {}
    state = out.get("state", {})
    sizes = out.get("sizes", {})  # the trained model's sizes: after growth they differ from cfg.model
    d = cfg.data
    per_token = {"seq_len": d.seq_len, "arch": cfg.model.arch, "mlm_probability": d.mlm_probability}
    # the model's rows (padded) at its trained sizes (after growth they differ from cfg.model)
    vocab = out.get("vocab") or len_vocab(tokenizer_dir)
    per_seq = sequence_flops(sizes or cfg.model, vocab=vocab, **per_token)
    teachers = {int(k): n for k, n in state.get("teacher_sequences", {}).items() if k != "kd"}
    teacher_flops = state.get("kd_flops", 0.0) + sum(
        n * sequence_flops(teacher_cfgs[k], vocab=teacher_cfgs[k]["vocab_size"], train=False, **per_token)
        for k, n in teachers.items())
    frw = None
    if state.get("frw"):  # the warmup ran first in this run, at the grown size: its own record
        f = state["frw"]
        # measured on the workers from their start; the worker group's start stays in the domain phase
        frw_wall = min(f.pop("wall_s"), wall)
        wall -= frw_wall
        frw = _phase_result(
            spec,
            f,
            checkpoint="",
            ppl=f.pop("ppl"),
            per_seq=per_seq,
            wall=frw_wall,
            sizes=sizes,
            nodes=out.get("nodes", []),
            phase="frw",
        )
    res = _phase_result(
        spec,
        state,
        ppl=out.get("ppl", {}),
        per_seq=per_seq,
        wall=wall,
        sizes=sizes,
        nodes=out.get("nodes", []),
        phase="main",
        checkpoint=checkpoint_uri(result.checkpoint.path, result.checkpoint.filesystem, storage_path),
    )
    res.bad_records, res.teacher_flops, res.frw = _bad_records(bad_log), teacher_flops, frw
    if "entered" in out:  # what the worker group's start and end cost around the workers' own time
        res.timings.update(start_s=out["entered"] - fit_started, end_s=fit_ended - out["exited"])
    return res


def _phase_result(
    spec: StageSpec,
    state: dict,
    *,
    checkpoint: str,
    ppl: dict,
    per_seq: float,
    wall: float,
    sizes: dict,
    nodes: list,
    phase: str,
) -> StageResult:
    """The record of one phase of a stage from its worker's counters (``TrainState`` as a dict)."""
    tokens = state.get("tokens", 0)
    return StageResult(
        index=spec.index,
        domain=spec.domain,
        checkpoint_path=checkpoint,
        ppl=ppl,
        steps=state.get("step", 0),
        tokens=tokens,
        train_flops=per_seq * (tokens // spec.cfg.data.seq_len),
        wall_time_s=wall,
        history=state.get("history", []),
        evals=state.get("evals", []),
        data_wait_s=state.get("data_wait_s", 0.0),
        restarts=state.get("restarts", 0),
        model_sizes=sizes,
        growth=state.get("growth"),
        teacher_s=state.get("teacher_s", 0.0),
        phase=phase,
        replayed_sequences=state.get("replayed", 0),
        nodes=nodes,
        timings={k: state.get(k) for k in ("first_batch_s", "compute_s", "data_wait_s", "eval_s",
                                            "checkpoint_s")},
        initial_ppl=state.get("initial_ppl"),
    )


def _bad_records(bad_log) -> dict:
    if bad_log is None:
        return {}
    try:
        return ray.get(bad_log.summary.remote())
    except ray.exceptions.RayActorError as e:  # the stage itself finished: do not lose it over a summary
        return {"count": None, "error": f"the bad-record log was lost ({type(e).__name__})"}


def ray_scaling(sc) -> ray.train.ScalingConfig:
    """Ray Train's ``ScalingConfig`` from ours (workers, CPUs/GPUs and custom resources, placement)."""
    resources = {"CPU": sc.cpus_per_worker, **sc.resources}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    return ray.train.ScalingConfig(
        num_workers=sc.num_workers,
        use_gpu=sc.use_gpu,
        resources_per_worker=resources,
        placement_strategy=sc.placement_strategy,
    )


def _prepare_teachers(spec: StageSpec, tokenizer_dir: str) -> dict[int, dict]:
    """Resolve and check this stage's KI teachers on the driver (a clear error before any worker starts);
    fill ``spec.teacher_dirs`` and return each teacher's HF config by domain id."""
    ki = spec.teacher
    if ki is None:
        return {}

    tok = load_tokenizer(tokenizer_dir)
    ids = {d.name: i for i, d in enumerate(spec.cfg.data.domains)}
    wanted = ({-1: ki.path} if ki.path else {}) | {ids[name]: path for name, path in ki.per_domain.items()}
    configs = {}
    for domain_id, path in wanted.items():
        spec.teacher_dirs[domain_id] = find_model_dir(path)
        configs[domain_id] = check_teacher_compatible(
            spec.teacher_dirs[domain_id], tok, spec.cfg.model.arch, spec.cfg.model.vocab_multiple
        )
    return configs


def len_vocab(tokenizer_dir: str) -> int:
    return len(load_tokenizer(tokenizer_dir))
