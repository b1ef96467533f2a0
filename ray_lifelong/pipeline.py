"""The lifelong pipeline: one Ray Train stage per domain, in order, each from the previous checkpoint.

This issue's pipeline is plain sequential continual pre-training (the "naive" baseline). Later methods
plug in at the stage boundary (growth, teacher) and in the stream (replay, prompts).

Run directory ``<output_dir>/<run_name>/``::

    config.yaml         resolved config
    tokenizer/          the HF tokenizer (trained here unless ``tokenizer.path`` is given)
    checkpoints/        Ray Train storage: one run per stage, ``<run>-stage<i>-<domain>/checkpoint_*``
    stages/<i>-<domain>/stage.json   completion marker + the stage's record
    results.json  report.md  ppl_matrix.png  loss_curves.png
    final_model/        HF model + tokenizer of the last stage (AutoModelFor...from_pretrained)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import ray.train

from ray_lifelong.config.load import save_config, to_yaml
from ray_lifelong.config.schema import LifelongConfig
from ray_lifelong.data.demo import write_demo_corpus
from ray_lifelong.data.tokenizer import (
    load_tokenizer,
    prompt_tokens,
    sample_texts,
    tokenizer_kind,
    train_tokenizer,
)
from ray_lifelong.data.stream import BadRecordLog, StreamOptions, quiet_ray_data, validation_dataset
from ray_lifelong.eval.metrics import average_increased_perplexity, average_perplexity
from ray_lifelong.stage.run import run_stage
from ray_lifelong.stage.spec import StageResult, StageSpec, read_tokenizer_files


class RunExistsError(RuntimeError):
    pass


def run_dir(cfg: LifelongConfig) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def prepare_demo(cfg: LifelongConfig) -> None:
    if cfg.demo.enabled:
        write_demo_corpus(cfg.demo.dir, cfg.demo.domains, train_docs=cfg.demo.train_docs,
                          valid_docs=cfg.demo.valid_docs, shards=cfg.demo.shards, seed=cfg.demo.seed)


def prepare_tokenizer(cfg: LifelongConfig, out_dir: Path) -> str:
    """Use ``tokenizer.path`` or train one on a sample of the domains into ``out_dir`` (once)."""
    if cfg.tokenizer.path:
        load_tokenizer(cfg.tokenizer.path)  # fail early with a clear message
        return cfg.tokenizer.path
    if not (out_dir / "tokenizer.json").exists():
        train_run_tokenizer(cfg, out_dir)
    return str(out_dir)


def train_run_tokenizer(cfg: LifelongConfig, out_dir: Path):
    """Train the config's tokenizer on a sample of its domains, with a prompt token per domain."""
    tc = cfg.tokenizer
    return train_tokenizer(sample_texts(cfg.data.domains, tc.sample_docs_per_domain), out_dir,
                           kind=tokenizer_kind(tc, cfg.model.arch), vocab_size=tc.vocab_size,
                           prompts=prompt_tokens([d.name for d in cfg.data.domains], tc.reserved_prompt_tokens),
                           min_frequency=tc.min_frequency)


def run_lifelong(cfg: LifelongConfig, *, resume: bool = False) -> dict:
    """Run every stage (skipping finished ones when ``resume``) and write the results; return them."""
    rdir = run_dir(cfg).resolve()
    marker_dir = rdir / "stages"
    if rdir.exists() and any(marker_dir.glob("*/stage.json")) and not resume:
        raise RunExistsError(f"{rdir} already holds finished stages: pass --resume to continue it, or choose "
                             f"another run_name=/output_dir=")
    saved = rdir / "config.yaml"
    if resume and saved.exists() and saved.read_text() != to_yaml(cfg):
        print(f"[run] note: config differs from the one saved in {saved}; the new one is used and saved")
    rdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    prepare_demo(cfg)
    tok_dir = prepare_tokenizer(cfg, rdir / "tokenizer")
    tok_files = read_tokenizer_files(tok_dir)
    storage = cfg.ray.storage_path or str(rdir / "checkpoints")
    names = [d.name for d in cfg.data.domains]
    quiet_ray_data()
    bad_log = BadRecordLog.remote()
    valid_ds = validation_dataset(cfg.data.domains, StreamOptions(tok_dir, cfg.model.arch, cfg.data), bad_log)
    results: list[StageResult] = []
    schedules = stage_schedules(cfg)
    prev_ckpt = None
    for i, dom in enumerate(cfg.data.domains):
        marker = marker_dir / f"{i:02d}-{dom.name}" / "stage.json"
        if marker.exists():
            res = StageResult(**json.loads(marker.read_text()))
            print(f"[run] stage {i} ({dom.name}) already finished: skipped")
        else:
            spec = StageSpec(
                cfg=cfg, index=i, domain=dom.name, eval_domains=names,
                steps=dom.steps or cfg.train.steps, batch_size=dom.batch_size or cfg.train.batch_size,
                lr=dom.lr or cfg.train.lr, tokenizer_files=tok_files, init_checkpoint=prev_ckpt,
                schedule=schedules[i])
            print(f"[run] stage {i}/{len(names) - 1}: domain {dom.name!r}, {spec.steps} steps")
            res = run_stage(spec, tokenizer_dir=tok_dir, storage_path=storage, valid_ds=valid_ds,
                            bad_log=bad_log)
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(res), indent=1))
            os.replace(tmp, marker)  # the marker appears only once the record is complete
        results.append(res)
        prev_ckpt = ray.train.Checkpoint(res.checkpoint_path)
    summary = summarize(names, results)
    (rdir / "results.json").write_text(json.dumps(summary, indent=1))
    export_final_model(prev_ckpt, rdir / "final_model")
    from ray_lifelong.report import write_report

    write_report(summary, rdir)
    print(f"[run] done: {rdir}/results.json, report.md, final_model/")
    return summary


def stage_schedules(cfg: LifelongConfig) -> list[tuple[int, int] | None]:
    """Per stage ``(offset, total)`` of the run-wide LR schedule (``train.lr_scope: run``), else ``None``."""
    steps = [d.steps or cfg.train.steps for d in cfg.data.domains]
    if cfg.train.lr_scope != "run":
        return [None] * len(steps)
    return [(sum(steps[:i]), sum(steps)) for i in range(len(steps))]


def summarize(domains: list[str], results: list[StageResult]) -> dict:
    """``results.json``: the PPL matrix (rows = after stage i, columns = domains), AP, AP+ and costs."""
    matrix = [[r.ppl[d] for d in domains] for r in results]
    cum_flops = 0.0
    stages = []
    for r in results:
        cum_flops += r.train_flops + r.teacher_flops
        stages.append({"domain": r.domain, "steps": r.steps, "tokens": r.tokens, "train_flops": r.train_flops,
                       "teacher_flops": r.teacher_flops, "teacher_s": r.teacher_s,
                       "cumulative_flops": cum_flops, "wall_time_s": r.wall_time_s,
                       "data_wait_s": r.data_wait_s, "restarts": r.restarts, "bad_records": r.bad_records,
                       "checkpoint": r.checkpoint_path, "model_sizes": r.model_sizes, "growth": r.growth,
                       "history": r.history, "evals": r.evals})
    return {
        "domains": domains,
        "ppl_matrix": matrix,
        "AP": average_perplexity(matrix, geometric=True),
        "AP_arithmetic": average_perplexity(matrix, geometric=False),
        "AP_plus": average_increased_perplexity(matrix),
        "stages": stages,
        "total_train_flops": sum(r.train_flops for r in results),
        "total_flops_with_teachers": cum_flops,
        "total_wall_time_s": sum(r.wall_time_s for r in results),
    }


def export_final_model(ckpt, out: Path) -> None:
    """Copy the last stage's HF model directory (weights + tokenizer) to ``final_model/``."""
    if ckpt is None:
        return
    if out.exists():
        shutil.rmtree(out)
    with ckpt.as_directory() as d:
        shutil.copytree(Path(d) / "model", out)
