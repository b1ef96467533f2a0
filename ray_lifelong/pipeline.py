"""The lifelong pipeline: one Ray Train stage per domain, in order, each from the previous checkpoint.

Growth, teachers and the function-recovering warmup act at the stage boundary; replay and prompts in the
stream. What a run writes, and where: :mod:`ray_lifelong.layout`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import ray.train

from ray_lifelong.config.load import ConfigError, save_config, to_yaml
from ray_lifelong.config.plan import stage_groups, stage_plans
from ray_lifelong.config.schema import LifelongConfig
from ray_lifelong.data.demo import prepare_demo
from ray_lifelong.data.memory import (
    clear_failure,
    keyed_shuffle,
    memory_uri,
    read_marker,
    write_failure,
    write_memory,
)
from ray_lifelong.data.packed import pack_domain, training_rows
from ray_lifelong.data.run_tokenizer import checkpoint_tokenizer, checkpoint_vocab, prepare_tokenizer
from ray_lifelong.data.sources import data_error_text, root_cause
from ray_lifelong.data.stream import (
    StreamOptions,
    bad_record_log,
    beside_driver,
    quiet_ray_data,
    validation_rows,
)
from ray_lifelong.data.tokenizer import load_tokenizer
from ray_lifelong.eval.metrics import average_increased_perplexity, average_perplexity
from ray_lifelong.layout import run_layout, stage_name
from ray_lifelong.models.init_from import prepare_start_model
from ray_lifelong.report import write_report
from ray_lifelong.stage.run import run_stages
from ray_lifelong.stage.spec import StageResult, StageSpec, read_tokenizer_files
from ray_lifelong.tracking import RunTracker


class RunExistsError(ConfigError):
    """The run directory already holds finished stages and ``--resume`` was not given."""


def check_run_start(cfg: LifelongConfig, resume: bool) -> None:
    """Refuse to start over a run with finished stages unless resuming (the CLI asks before starting Ray)."""
    lay = run_layout(cfg)
    if not resume and lay.has_finished_stages():
        raise RunExistsError(
            f"{lay.root} already holds finished stages: pass --resume to continue it, or choose "
            f"another run_name=/output_dir="
        )


def run_lifelong(
    cfg: LifelongConfig, *, resume: bool = False, callbacks=None, trial: str | None = None
) -> dict:
    """Run every stage (skipping finished ones when ``resume``) and write the results; return them.

    Consecutive stages with the same workers train in one Ray Train run (:func:`stage_groups`), each from
    the model the stage before left; each stage's record is written (``stages/<label>/stage.json``) as soon
    as it finishes. ``callbacks``: Ray Train ``UserCallback``s given to every run (``ray-lifelong tune``
    reports through them); ``trial``: the sweep trial the run is, named in its console lines.
    """
    check_run_start(cfg, resume)
    lay = run_layout(cfg)
    if resume and lay.config.exists() and lay.config.read_text() != to_yaml(cfg):
        print(f"[run] note: config differs from the one saved in {lay.config}; the new one is used and saved")
    save_config(cfg, lay.config)
    tok_dir, start_ckpt = prepare_start(cfg)
    tok_files = read_tokenizer_files(tok_dir)
    names = [d.name for d in cfg.data.domains]
    opts = StreamOptions(tok_dir, cfg.model.arch, cfg.data)
    plans = stage_plans(cfg)
    replay = cfg.continual.replay
    tracker = RunTracker(cfg)
    # a domain's memory depends on its data alone: written in the background while the stages train
    kept = [i for i in range(len(names) - 1)] if replay.enabled else []
    memory_uris = {i: memory_uri(lay.memory, i, names[i]) for i in kept}
    specs = [
        StageSpec(cfg=cfg, index=p.index, domain=p.domain, eval_domains=names, tokenizer_files=tok_files,
                  batch_size=p.batch_size, steps=p.steps, lr=p.lr, schedule=p.schedule,
                  replay_uris=[memory_uris[j] for j in kept if j < p.index], trial=trial)
        for p in plans
    ]
    done: dict[int, StageResult] = {}
    for spec in specs:
        res = _finished(lay, spec.label)
        if res is not None:
            # (run dirs of earlier versions hold the warmup's record as a stage of its own)
            res.frw = res.frw or (_finished(lay, spec.frw_label) if plans[spec.index].frw_steps else None)
            done[spec.index] = res
            print(f"[run] stage {spec.console()} already finished: skipped")
    # what only training needs: a run whose stages have all finished rewrites its results without Ray
    bad_log = valid = None
    if len(done) < len(specs):
        quiet_ray_data()
        bad_log = bad_record_log(cfg.data.on_bad_record)
        valid = validation_rows(cfg.data.domains, opts, bad_log, prompts=cfg.continual.prompts)
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory")
    memories: dict = {}
    results: dict[int, StageResult] = dict(done)

    def record(res: StageResult) -> None:  # a stage has finished (called while the run goes on)
        marker = lay.stage_marker(specs[res.index].label)
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(res), indent=1))  # the warmup's record inside the stage's
        os.replace(tmp, marker)  # the marker appears only once the record is complete
        results[res.index] = res
        if res.initial_ppl:  # (the workers said it when they measured it)
            tracker.initial(res.initial_ppl)
        run_step = sum(p.steps + p.frw_steps for p in plans[: res.index])
        rows = [[results[j].ppl[d] for d in names] for j in range(res.index + 1)]
        tracker.stage(res, run_step, rows, names)
        print(f"[run] stage {specs[res.index].console()} done: "
              + ", ".join(f"{d} ppl {p:.2f}" for d, p in res.ppl.items()) + f" -> {res.checkpoint_path}")

    prev_ckpt = start_ckpt
    try:
        for group in stage_groups(cfg):
            todo = [i for i in group if i not in done]
            if todo:
                first = todo[0]
                if first > 0:
                    prev_ckpt = ray.train.Checkpoint(results[first - 1].checkpoint_path)
                run_specs = [replace(specs[i], init_checkpoint=prev_ckpt if i == first else None,
                                     continues=i != first) for i in todo]
                # packed first (data.pretokenize), so that the memories read the packed domains
                streams = {i: stage_stream(cfg, i, opts, bad_log) for i in todo}
                for i in kept:
                    if i not in memories and i <= todo[-1] and read_marker(memory_uris[i]) is None:
                        memories[i] = background.submit(_memory_of, cfg, i, memory_uris[i], opts, bad_log)
                pending = tuple(memory_uris[i] for i, f in memories.items() if not f.done())
                print(f"[run] stages {specs[first].console()} to {specs[todo[-1]].label}: one Ray Train run"
                      if len(todo) > 1 else f"[run] stage {specs[first].console()}")
                run_stages(run_specs, tokenizer_dir=tok_dir, storage_path=lay.storage, valid=valid,
                           bad_log=bad_log, streams=streams, callbacks=callbacks, on_result=record,
                           recorded=first - 1, written_meanwhile=pending,
                           name=stage_name(cfg.run_name, group[0], names[group[0]]))
            prev_ckpt = ray.train.Checkpoint(results[group[-1]].checkpoint_path)
        mem_records = [memories[i].result() if i in memories else read_marker(memory_uris[i]) for i in kept]
    finally:
        background.shutdown(wait=False, cancel_futures=True)
    ordered = [results[i] for i in range(len(names))]
    frw_results = {i: r.frw for i, r in enumerate(ordered) if r.frw is not None}
    for r in ordered:
        r.frw = None
    summary = results_summary(names, ordered, frw_results, mem_records)
    lay.results.write_text(json.dumps(summary, indent=1))
    export_final_model(prev_ckpt, lay.final_model)
    write_report(summary, lay.root)
    tracker.close(lay.results)
    print(f"[run] done: {lay.results}, report.md, final_model/")
    return summary


def unfinished_stages(cfg: LifelongConfig) -> list[str]:
    """The labels of the stages of ``cfg``'s run that have no record yet (every stage of a new run): with
    none left, ``ray-lifelong run --resume`` rewrites the results without starting Ray."""
    lay = run_layout(cfg)
    return [p.label for p in stage_plans(cfg) if not lay.stage_marker(p.label).exists()]


def _finished(lay, label: str) -> StageResult | None:
    """The record of the stage (or warmup) ``label`` if it has finished."""
    marker = lay.stage_marker(label)
    if not marker.exists():
        return None
    rec = json.loads(marker.read_text())
    frw = rec.pop("frw", None)
    return StageResult(**rec, frw=StageResult(**frw) if frw else None)


def _memory_of(cfg: LifelongConfig, i: int, uri: str, opts: StreamOptions, bad_log) -> dict:
    """Write domain ``i``'s replay memory (once); a failure is left at ``uri`` for the waiting workers."""
    dom, replay, lay = cfg.data.domains[i], cfg.continual.replay, run_layout(cfg)
    clear_failure(uri)
    try:
        rows = training_rows([(i, dom)], opts, prompts=cfg.continual.prompts, packed_root=lay.packed,
                             log=bad_log)
        write = functools.partial(write_memory, fraction=replay.memory_fraction,
                                  max_sequences=replay.memory_max_sequences, seed=cfg.train.seed + i)
        rec = beside_driver(write, rows, uri)
    except Exception as e:
        write_failure(uri, data_error_text(e) or f"writing the memory of {dom.name!r}: {root_cause(e)}")
        raise
    print(f"[run] memory of {dom.name!r}: {rec['sequences']} sequences -> {rec['uri']}")
    return rec


def prepare_start(cfg: LifelongConfig) -> tuple[str, ray.train.Checkpoint | None]:
    """What a run starts from, made before any Ray work (the CLI calls it before starting Ray, so that a
    checkpoint that does not fit fails first): the run's tokenizer directory, and stage 0's model, ``None``
    for a fresh one of ``model.*`` or ``model.init_from`` prepared under the run's ``init/`` (its URI
    copied once, the domains' prompt tokens given embedding rows).

    Raises:
        ConfigError: the checkpoint's tokenizer does not fit (see :func:`checkpoint_tokenizer`).
    """
    lay = run_layout(cfg)
    lay.root.mkdir(parents=True, exist_ok=True)
    prepare_demo(cfg)
    tok_dir = prepare_tokenizer(cfg, lay.tokenizer)
    if not cfg.model.init_from:
        return tok_dir, None
    known = checkpoint_vocab(cfg)
    vocab = load_tokenizer(tok_dir).get_vocab()
    new_ids = sorted(i for t, i in vocab.items() if t not in known)
    start = prepare_start_model(cfg, tokens=len(vocab), new_ids=new_ids, known=len(known))
    return tok_dir, ray.train.Checkpoint(start)


def check_start(cfg: LifelongConfig) -> None:
    """What :func:`prepare_start` checks without Ray, for the commands that prepare their runs later
    (``pack``, ``ki``, ``tune``): ``model.init_from``'s tokenizer fits its checkpoint (a ``ConfigError``
    naming the key, before Ray starts)."""
    if cfg.model.init_from:
        with tempfile.TemporaryDirectory() as d:
            checkpoint_tokenizer(cfg, d)


def check_pretokenize(cfg: LifelongConfig) -> None:
    if not cfg.data.pretokenize:
        raise ConfigError(
            "data.pretokenize is false: its runs stream the text files and would not read packed "
            "domains (set data.pretokenize=true)"
        )


def pack_domains(cfg: LifelongConfig, prompts: tuple[bool, ...] | None = None) -> list[dict]:
    """``ray-lifelong pack``: tokenize and pack every domain now, as the config's runs will read them
    (``data.pretokenize``), so that runs started later or side by side (a benchmark's methods, a sweep)
    find them packed. The tokenizer is prepared as a run prepares it (``tokenizer.path`` or trained into
    the run directory). ``prompts``: the variants to pack (default: the config's ``continual.prompts``;
    ``(True, False)`` for runs that differ in prompts). Returns the packed domains' records."""
    check_pretokenize(cfg)
    lay = run_layout(cfg)
    lay.root.mkdir(parents=True, exist_ok=True)
    prepare_demo(cfg)
    tok_dir = prepare_tokenizer(cfg, lay.tokenizer)
    quiet_ray_data()
    opts = StreamOptions(tok_dir, cfg.model.arch, cfg.data)
    return [
        pack_domain(i, dom, opts, lay.packed, prompts=p)
        for p in (prompts or (cfg.continual.prompts,))
        for i, dom in enumerate(cfg.data.domains)
    ]


def stage_stream(cfg: LifelongConfig, index: int, opts: StreamOptions, log=None):
    """The training stream of stage ``index``: its domain (prompted when ``continual.prompts``), or for
    ``continual.joint`` every domain so far, shuffled together; packed rows under ``data.pretokenize``."""
    doms = list(enumerate(cfg.data.domains))
    chosen = doms[: index + 1] if cfg.continual.joint else [doms[index]]
    ds = training_rows(
        chosen, opts, prompts=cfg.continual.prompts, packed_root=run_layout(cfg).packed, log=log
    )
    # a full shuffle, not randomize_block_order: a domain's file packs into few large blocks, so a block
    # shuffle still trains on one domain at a time and a stage that ends early never sees the later ones;
    # keyed by row, so the order is the same from the text stream and from packed domains
    return keyed_shuffle(ds, seed=cfg.train.seed + index) if len(chosen) > 1 else ds


def stage_record(r: StageResult) -> dict:
    return {
        "domain": r.domain,
        "phase": r.phase,
        "steps": r.steps,
        "tokens": r.tokens,
        "train_flops": r.train_flops,
        "teacher_flops": r.teacher_flops,
        "teacher_s": r.teacher_s,
        "wall_time_s": r.wall_time_s,
        "data_wait_s": r.data_wait_s,
        "restarts": r.restarts,
        "bad_records": r.bad_records,
        "checkpoint": r.checkpoint_path,
        "model_sizes": r.model_sizes,
        "growth": r.growth,
        "replayed_sequences": r.replayed_sequences,
        "nodes": r.nodes,
        "timings": r.timings,
        "history": r.history,
        "evals": r.evals,
    }


def results_summary(
    domains: list[str],
    results: list[StageResult],
    frw: dict[int, StageResult] | None = None,
    memories: list[dict] | None = None,
) -> dict:
    """``results.json``: the PPL matrix (rows = after stage i, columns = domains), the starting checkpoint's
    perplexities (``initial_ppl``, in the domains' order), AP, AP+ and costs.

    A stage's FLOPs and wall time include its function-recovering warmup (recorded under ``frw``).
    """
    frw = frw or {}
    matrix = [[r.ppl[d] for d in domains] for r in results]
    initial = results[0].initial_ppl if results else None
    cum_flops = 0.0
    stages = []
    for i, r in enumerate(results):
        parts = [r] + ([frw[i]] if i in frw else [])
        flops = sum(p.train_flops + p.teacher_flops for p in parts)
        cum_flops += flops
        rec = stage_record(r)
        rec.update(
            stage_flops=flops, cumulative_flops=cum_flops, stage_wall_time_s=sum(p.wall_time_s for p in parts)
        )
        if i in frw:
            rec["frw"] = stage_record(frw[i])
            rec["growth"] = frw[i].growth  # the warmup phase is where the model grew
        stages.append(rec)
    everything = results + list(frw.values())
    return {
        "domains": domains,
        "ppl_matrix": matrix,
        # model.init_from's perplexity before the first stage (the row above the matrix); None otherwise
        "initial_ppl": [initial[d] for d in domains] if initial else None,
        "AP": average_perplexity(matrix, geometric=True),
        "AP_arithmetic": average_perplexity(matrix, geometric=False),
        "AP_plus": average_increased_perplexity(matrix),
        "cumulative_flops": [s["cumulative_flops"] for s in stages],
        "stages": stages,
        "memories": memories or [],
        "total_train_flops": sum(r.train_flops for r in everything),
        "total_flops_with_teachers": cum_flops,
        "total_wall_time_s": sum(r.wall_time_s for r in everything),
    }


def export_final_model(ckpt, out: Path) -> None:
    """Copy the last stage's HF model directory (weights + tokenizer) to ``final_model/``."""
    if ckpt is None:
        return
    if out.exists():
        shutil.rmtree(out)
    with ckpt.as_directory() as d:
        shutil.copytree(Path(d) / "model", out)
