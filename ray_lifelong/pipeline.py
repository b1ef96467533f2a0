"""The lifelong pipeline: one Ray Train stage per domain, in order, each from the previous checkpoint.

Growth, teachers and the function-recovering warmup act at the stage boundary; replay and prompts in the
stream. What a run writes, and where: :mod:`ray_lifelong.layout`.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import ray.train

from ray_lifelong.config.load import ConfigError, save_config, to_yaml
from ray_lifelong.config.plan import stage_plans
from ray_lifelong.config.schema import LifelongConfig
from ray_lifelong.data.demo import prepare_demo
from ray_lifelong.data.memory import keyed_shuffle, memory_uri, read_marker, write_memory
from ray_lifelong.data.packed import pack_domain, training_rows
from ray_lifelong.data.stream import StreamOptions, bad_record_log, quiet_ray_data, validation_rows
from ray_lifelong.data.tokenizer import checkpoint_vocab, load_tokenizer, prepare_tokenizer
from ray_lifelong.eval.metrics import average_increased_perplexity, average_perplexity
from ray_lifelong.layout import run_layout
from ray_lifelong.models.init_from import prepare_start_model
from ray_lifelong.report import write_report
from ray_lifelong.stage.run import run_stage
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


def run_lifelong(cfg: LifelongConfig, *, resume: bool = False, callbacks=None) -> dict:
    """Run every stage (skipping finished ones when ``resume``) and write the results; return them.

    ``callbacks``: Ray Train ``UserCallback``s given to every stage (``ray-lifelong tune`` reports through
    them).
    """
    check_run_start(cfg, resume)
    lay = run_layout(cfg)
    if resume and lay.config.exists() and lay.config.read_text() != to_yaml(cfg):
        print(f"[run] note: config differs from the one saved in {lay.config}; the new one is used and saved")
    save_config(cfg, lay.config)
    tok_dir, prev_ckpt = prepare_start(cfg)
    tok_files = read_tokenizer_files(tok_dir)
    names = [d.name for d in cfg.data.domains]
    quiet_ray_data()
    bad_log = bad_record_log()
    opts = StreamOptions(tok_dir, cfg.model.arch, cfg.data)
    valid = validation_rows(cfg.data.domains, opts, bad_log, prompts=cfg.continual.prompts)
    results: list[StageResult] = []
    frw_results: dict[int, StageResult] = {}
    memories: list[dict] = []
    plans = stage_plans(cfg)
    replay = cfg.continual.replay
    tracker = RunTracker(cfg)
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory")

    def memory_of(i: int, dom) -> dict:
        uri = memory_uri(lay.memory, i, dom.name)
        done = read_marker(uri)
        if done is not None:
            return done
        rows = training_rows([(i, dom)], opts, prompts=cfg.continual.prompts, packed_root=lay.packed,
                             log=bad_log)
        return write_memory(rows, uri, fraction=replay.memory_fraction,
                            max_sequences=replay.memory_max_sequences, seed=cfg.train.seed + i)
    upcoming = None  # the next stage's stream, packed in the background (data.pretokenize)
    run_step = 0  # optimizer steps of the stages before (warmups included): the metrics' step axis

    def finished(label: str) -> StageResult | None:
        marker = lay.stage_marker(label)
        if not marker.exists():
            return None
        rec = json.loads(marker.read_text())
        frw = rec.pop("frw", None)
        return StageResult(**rec, frw=StageResult(**frw) if frw else None)

    for i, dom in enumerate(cfg.data.domains):
        plan = plans[i]
        earlier = [m["uri"] for m in memories]
        spec = StageSpec(
            cfg=cfg,
            index=i,
            domain=dom.name,
            eval_domains=names,
            tokenizer_files=tok_files,
            batch_size=plan.batch_size,
            steps=plan.steps,
            lr=plan.lr,
            init_checkpoint=prev_ckpt,
            schedule=plan.schedule,
            replay_uris=earlier if replay.enabled else [],
        )
        # ELLE: a stage that grows first recovers the old function on the earlier domains' memory
        # (spec.frw_steps)
        res = finished(spec.label)
        ran_now = res is None
        # the domain's replay memory depends on its data alone: it is written while the stage trains
        if ran_now:  # under data.pretokenize the domain is packed first (while the stage before trained)
            stream = upcoming.result() if upcoming is not None else stage_stream(cfg, i, opts, bad_log)
        upcoming = None
        memory = background.submit(memory_of, i, dom) if replay.enabled and i < len(names) - 1 else None
        if cfg.data.pretokenize and i < len(names) - 1 and not lay.stage_marker(plans[i + 1].label).exists():
            upcoming = background.submit(stage_stream, cfg, i + 1, opts, bad_log)
        if res is not None:
            print(f"[run] stage {spec.label} already finished: skipped")
        else:
            print(
                f"[run] stage {spec.label}: "
                + (
                    f"function-recovering warmup on the memory ({spec.frw_steps} steps), then "
                    if spec.frw_steps
                    else ""
                )
                + f"{spec.steps} steps"
            )
            res = run_stage(
                spec,
                tokenizer_dir=tok_dir,
                storage_path=lay.storage,
                valid=valid,
                bad_log=bad_log,
                train_ds=stream,
                callbacks=callbacks,
            )
            marker = lay.stage_marker(spec.label)
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(res), indent=1))  # the warmup's record inside the stage's
            os.replace(tmp, marker)  # the marker appears only once the record is complete
        # (run dirs of earlier versions hold the warmup's record as a stage of its own)
        frw = res.frw or (finished(spec.frw_label) if spec.frw_steps else None)
        if frw is not None:
            frw_results[i] = frw
        results.append(res)
        if ran_now:
            if res.initial_ppl:
                tracker.initial(res.initial_ppl)
            tracker.stage(res, run_step, [[r.ppl[d] for d in names] for r in results], names)
        run_step += res.steps + (frw.steps if frw is not None else 0)
        res.frw = None
        if res.initial_ppl:
            print("[run] model.init_from before training: "
                  + ", ".join(f"{d} ppl {p:.2f}" for d, p in res.initial_ppl.items()))
        prev_ckpt = ray.train.Checkpoint(res.checkpoint_path)
        if memory is not None:
            memories.append(memory.result())
            print(
                f"[run] memory of {dom.name!r}: {memories[-1]['sequences']} sequences -> "
                f"{memories[-1]['uri']}"
            )
    background.shutdown()
    summary = results_summary(names, results, frw_results, memories)
    lay.results.write_text(json.dumps(summary, indent=1))
    export_final_model(prev_ckpt, lay.final_model)
    write_report(summary, lay.root)
    tracker.close(lay.results)
    print(f"[run] done: {lay.results}, report.md, final_model/")
    return summary


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
