"""Run one stage on Ray Train: the only place a ``TorchTrainer`` is built."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

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
from ray_lifelong.models.init_from import student_rows
from ray_lifelong.stage.checkpoint import checkpoint_uri
from ray_lifelong.stage.loop import train_dataset_name, train_stages
from ray_lifelong.stage.spec import StageResult, StageSpec


class StageFailedError(RuntimeError):
    """A stage that Ray Train could not finish; the message carries the root cause."""


def run_stage(spec: StageSpec, *, tokenizer_dir: str, storage_path: str, valid: ValidationRows, bad_log=None,
              train_ds=None, callbacks=None) -> StageResult:
    """Train ``spec.domain`` on Ray Train and evaluate every domain; return the stage record (one stage:
    :func:`run_stages`)."""
    (res,) = run_stages([spec], tokenizer_dir=tokenizer_dir, storage_path=storage_path, valid=valid,
                        bad_log=bad_log, streams={spec.index: train_ds} if train_ds is not None else None,
                        callbacks=callbacks)
    return res


def run_stages(specs: list[StageSpec], *, tokenizer_dir: str, storage_path: str, valid: ValidationRows,
               bad_log=None, streams: dict | None = None, callbacks=None, on_result=None,
               recorded: int | None = None, written_meanwhile: tuple[str, ...] = (),
               name: str | None = None) -> list[StageResult]:
    """Train the consecutive stages ``specs`` (one scaling) in one Ray Train run: one worker group trains
    them in turn, each from the model the one before left (:func:`train_stages`), and evaluates every domain
    after each; return their records in order.

    Args:
        valid: the run's validation rows (:func:`validation_rows`).
        bad_log: a :class:`BadRecordLog` actor collecting skipped records.
        streams: each stage's training stream by stage index (rows ``{input_ids, domain_id}``); a stage
            without one streams its domain's own training files.
        callbacks: Ray Train ``UserCallback``s of the run (a Tune sweep forwards validations).
        on_result: called on the driver with each stage's record as soon as the stage has finished.
        recorded: the last stage whose record the driver holds (a resumed run: a stage that finished but
            was not recorded is reported again from its checkpoint); default: none of ``specs``.
        written_meanwhile: replay memories the driver is still writing (the workers wait for them).
        name: the Ray Train run (its checkpoints' folder); default: named after the first stage.
    """
    cfg: LifelongConfig = specs[0].cfg
    quiet_ray_data()
    opts = StreamOptions(tokenizer_dir=tokenizer_dir, arch=cfg.model.arch, data=cfg.data)
    teacher_cfgs = {s.index: _prepare_teachers(s, tokenizer_dir) for s in specs}
    streams = dict(streams or {})
    for s in specs:
        if streams.get(s.index) is None:  # the domain's own training rows (packed once under pretokenize)
            streams[s.index] = training_rows([(s.index, s.domain_cfg)], opts, prompts=cfg.continual.prompts,
                                             log=bad_log, packed_root=run_layout(cfg).packed)
    # read by the workers themselves: one that is missing is said here
    check_memories([u for s in specs for u in s.replay_uris if u not in written_meanwhile])
    folder = Path(tempfile.mkdtemp(prefix="ray_lifelong_records_"))
    first = specs[0]
    keep = cfg.ray.num_to_keep
    scaling = first.domain_cfg.scaling or cfg.scaling
    trainer = TorchTrainer(
        train_stages,
        train_loop_config={"specs": specs, "valid": valid,
                           "recorded": first.index - 1 if recorded is None else recorded},
        # stages may take their own workers (e.g. more after growth): a run holds stages of one scaling
        scaling_config=ray_scaling(scaling),
        run_config=RunConfig(
            name=name or stage_name(cfg.run_name, first.index, first.domain, first.segment),
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures,
                                         controller_failure_limit=cfg.ray.startup_failures),
            # every stage's final checkpoint, and the latest num_to_keep others (keep_score)
            checkpoint_config=CheckpointConfig(num_to_keep=keep + len(specs) if keep else None,
                                               checkpoint_score_attribute="keep",
                                               checkpoint_score_order="max"),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[_StageRecords(str(folder), storage_path), *(callbacks or [])]),
        # validation rows and replay memories travel apart: every worker scores all validation rows (its
        # share by index) and draws replayed rows from the whole memory
        datasets={train_dataset_name(s.index): streams[s.index] for s in specs},
        # one worker reads each stream whole, in its own process: a split would add a coordinator actor (a
        # process) per stage to hand the same rows, in the same order, to that one worker
        dataset_config=DataConfig(datasets_to_split=[train_dataset_name(s.index) for s in specs]
                                  if scaling.num_workers > 1 else []),
    )
    by_index = {s.index: s for s in specs}
    results: list[StageResult] = []
    fit_started = time.time()
    last_end = [fit_started]  # when the stage before ended (or the fit began): a stage's wall time from it
    failures: list[BaseException] = []

    def collect() -> None:
        """Turn every stage record that arrived into a ``StageResult``, in stage order."""
        while True:
            index = results[-1].index + 1 if results else None
            found = sorted(folder.glob("*.json"))
            if index is not None:
                found = [f for f in found if int(f.stem) >= index]
            if not found:
                return
            rec = json.loads(found[0].read_text())
            spec = by_index[int(found[0].stem)]
            res = _stage_result(spec, rec["record"], rec["checkpoint"], tokenizer_dir,
                                teacher_cfgs[spec.index], since=last_end[0])
            last_end[0] = rec["record"]["reported"]
            res.bad_records = _bad_records(bad_log)
            results.append(res)
            found[0].unlink()
            if on_result is not None:
                on_result(res)

    stop = threading.Event()

    def poll() -> None:
        try:
            while not stop.wait(0.25):
                collect()
        except BaseException as e:  # raised on the driver's thread once the run returns
            failures.append(e)

    poller = threading.Thread(target=poll, name="stage-records", daemon=True)
    poller.start()
    try:
        trainer.fit()
    except Exception as e:  # TrainingFailedError wraps the worker's exception several levels deep
        # bad input found while streaming is the user's to fix (the CLI's exit 2), not a failed stage
        bad_input = data_error_text(e)
        error = DataError if bad_input else StageFailedError
        done = len(results)
        at = specs[min(done, len(specs) - 1)]
        raise error(f"stage {at.index} ({at.domain}) failed: {bad_input or root_cause(e)}") from e
    finally:
        stop.set()
        poller.join()
    if failures:
        raise failures[0]
    collect()
    shutil.rmtree(folder, ignore_errors=True)
    return results


class _StageRecords(ray.train.UserCallback):
    """Runs in Ray Train's controller (on the driver's node): writes each finished stage's record, with the
    checkpoint as a URI, into ``folder`` for :func:`run_stages` to pick up while the run goes on."""

    def __init__(self, folder: str, storage_path: str):
        self.folder, self.storage_path = folder, storage_path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = metrics[0]
        if not m.get("final"):
            return
        if checkpoint is not None:
            uri = checkpoint_uri(checkpoint.path, checkpoint.filesystem, self.storage_path)
        else:  # reported again from its checkpoint after a restart
            uri = checkpoint_uri(m["checkpoint_path"], None, self.storage_path)
        out = Path(self.folder, f"{m['stage']:04d}.json")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"record": m["record"], "checkpoint": uri}))
        os.replace(tmp, out)


def _stage_result(spec: StageSpec, out: dict, checkpoint: str, tokenizer_dir: str, teacher_cfgs: dict, *,
                  since: float) -> StageResult:
    """A finished stage's record on the driver from its workers' report: FLOPs counted, the warmup split
    off, wall time from ``since`` (the stage before ended, or the run began: the worker group's start is the
    first stage's)."""
    cfg = spec.cfg
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
    began = min(since, out["entered"])  # a stage reported again after a restart began before it
    wall = out["reported"] - began
    frw = None
    if state.get("frw"):  # the warmup ran first in this run, at the grown size: its own record
        f = dict(state["frw"])
        # measured on the workers from their start; the worker group's start stays in the domain phase
        frw_wall = min(f.pop("wall_s"), wall)
        wall -= frw_wall
        frw = _phase_result(spec, f, checkpoint="", ppl=f.pop("ppl"), per_seq=per_seq, wall=frw_wall,
                            sizes=sizes, nodes=out.get("nodes", []), phase="frw")
    res = _phase_result(spec, state, ppl=out.get("ppl", {}), per_seq=per_seq, wall=wall, sizes=sizes,
                        nodes=out.get("nodes", []), phase="main", checkpoint=checkpoint)
    res.teacher_flops, res.frw = teacher_flops, frw
    res.timings["start_s"] = out["entered"] - began
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
    if bad_log is None:  # on_bad_record: error, under which no record is skipped
        return {"count": 0, "by_file": {}, "examples": []}
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
        configs[domain_id] = check_teacher_compatible(spec.teacher_dirs[domain_id], tok, spec.cfg.model.arch,
                                                      student_rows(spec.cfg, len(tok)))
    return configs


def len_vocab(tokenizer_dir: str) -> int:
    return len(load_tokenizer(tokenizer_dir))
