"""``ray-lifelong finetune``: every (task, seed) a Ray Train run, several at once as Tune trials; the
results aggregated into ``downstream.json`` and ``downstream.md`` in the run directory."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from ray_lifelong.config import ConfigError, LifelongConfig
from ray_lifelong.data.sources import root_cause
from ray_lifelong.data.tokenizer import load_tokenizer
from ray_lifelong.downstream.loop import finetune_loop
from ray_lifelong.downstream.tasks import EncodedTask, encode_task
from ray_lifelong.eval.classification import majority_baseline
from ray_lifelong.layout import run_layout
from ray_lifelong.models.build import find_model_dir, saved_model_arch
from ray_lifelong.stage.run import ray_scaling


def resolve_model(path: str) -> tuple[str, str]:
    """``(local directory, URI for the workers)`` of the HF model to fine-tune: a run directory (its
    ``final_model/``), a stage checkpoint (``model/``), an HF model directory, or a URI of one."""
    if "://" in path:  # the driver reads the tokenizer and config from a copy; the workers fetch the URI
        import ray.train

        local = ray.train.Checkpoint(path).to_directory(tempfile.mkdtemp(prefix="ray_lifelong_model_"))
        return find_model_dir(local), path
    local = find_model_dir(str(Path(path).resolve()))
    return local, local


def pretrained_with_prompts(model_dir: str) -> bool:
    """Whether the run that produced ``model_dir`` trained with domain prompts (its saved config.yaml, beside
    ``final_model/`` or ``model/``); ``False`` when there is none to read."""
    from omegaconf import OmegaConf

    saved = Path(model_dir).parent / "config.yaml"
    if not saved.is_file():
        return False
    return bool(OmegaConf.select(OmegaConf.load(saved), "continual.prompts", default=False))


def run_finetune(cfg: LifelongConfig, *, model: str | None = None, start_ray=None) -> dict:
    """Fine-tune the model on every task and seed of ``cfg.finetune`` (finished ones are kept).

    ``start_ray``: called before the first job is trained, when Ray is not running yet (the command line's
    session); with every job finished, Ray is not started at all.
    """
    from ray import tune

    fc = cfg.finetune
    if not fc.tasks:
        raise ConfigError(
            "finetune.tasks is empty: list the tasks to fine-tune on (configs/finetune/downstream.yaml)"
        )
    lay = run_layout(cfg)
    rdir = lay.root
    local, uri = resolve_model(model or fc.model or str(lay.final_model))
    tokenizer = load_tokenizer(local)
    arch = saved_model_arch(local)
    prompts = fc.prompts if fc.prompts is not None else pretrained_with_prompts(local)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = rdir / fc.output
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"[finetune] {uri} ({arch}), prompts {'on' if prompts else 'off'}, tasks "
        f"{[t.name for t in fc.tasks]}, seeds {fc.seeds} -> {out}"
    )
    tasks = {
        t.name: encode_task(t, tokenizer, arch=arch, max_length=fc.max_length, prompts=prompts)
        for t in fc.tasks
    }
    key = job_key(cfg, uri, prompts)
    jobs = [f"{name}::{seed}" for name in tasks for seed in fc.seeds
            if not _record_path(out, name, seed, key).exists()]
    if not jobs:
        print(f"[finetune] all {len(tasks) * len(fc.seeds)} jobs finished before: kept")
    else:
        if start_ray is not None:
            start_ray()
        trainable = tune.with_resources(
            tune.with_parameters(
                _job, cfg=cfg, tasks=tasks, model_uri=uri, pad_id=pad_id, out=str(out), key=key
            ),
            {"cpu": 0.25},
        )
        grid = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=fc.max_concurrent),
            run_config=tune.RunConfig(name=f"tune-{os.getpid()}", storage_path=str(out / "tune"), verbose=0),
        ).fit()
        failed = [f"{r.config['job']}: {_error_text(r.error)}" for r in grid if r.error]
        if failed:
            raise RuntimeError("fine-tuning failed for " + "; ".join(failed))
    summary = downstream_summary(tasks, fc.seeds, out, key, model=uri, prompts=prompts)
    (out / "downstream.json").write_text(json.dumps(summary, indent=1))
    (out / "downstream.md").write_text(table(summary))
    print(f"[finetune] average test over tasks {summary['average']:.4f}: {out / 'downstream.md'}")
    return summary


def job_key(cfg: LifelongConfig, model_uri: str, prompts: bool) -> str:
    """What a finished job's record depends on (model, prompts, tasks, optimisation; not the seeds or the
    concurrency): a rerun with other settings trains again instead of reusing a record that does not apply."""
    import hashlib
    from dataclasses import asdict

    fc = asdict(cfg.finetune)
    for k in ("seeds", "max_concurrent", "scaling", "output", "model", "prompts"):
        fc.pop(k)
    blob = json.dumps({"model": model_uri, "prompts": prompts, **fc}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _record_path(out: Path, task: str, seed: int, key: str) -> Path:
    return out / task / f"seed{seed}-{key}.json"


def _job(
    params: dict,
    *,
    cfg: LifelongConfig,
    tasks: dict[str, EncodedTask],
    model_uri: str,
    pad_id: int,
    out: str,
    key: str,
) -> None:
    """One Tune trial: the Ray Train run of one task and seed; its record is written when it finishes."""
    from ray import tune
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    name, seed = params["job"].split("::")
    task, fc = tasks[name], cfg.finetune
    trainer = TorchTrainer(
        finetune_loop,
        train_loop_config={
            "task": task,
            "finetune": fc,
            "seed": int(seed),
            "pad_id": pad_id,
            "model_uri": model_uri,
        },
        scaling_config=ray_scaling(fc.scaling or cfg.scaling),
        run_config=RunConfig(
            name=f"{name}-seed{seed}",
            storage_path=str(Path(out) / "checkpoints"),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )
    res = trainer.fit()
    rec = {"task": name, "seed": int(seed), **res.return_value}
    path = _record_path(Path(out), name, int(seed), key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)  # complete records only: a rerun skips exactly the finished jobs
    tune.report({"valid": rec["valid"], "test": rec["test"]})


def downstream_summary(
    tasks: dict[str, EncodedTask], seeds: list[int], out: Path, key: str, *, model: str, prompts: bool
) -> dict:
    """Per task: the metric on valid and test per seed, their mean and standard deviation, the majority
    baseline; and the average of the tasks' test means."""
    per_task = {}
    for name, task in tasks.items():
        recs = {s: json.loads(_record_path(out, name, s, key).read_text()) for s in seeds}
        valid = [recs[s]["valid"] for s in seeds]
        test = [recs[s]["test"] for s in seeds]
        per_task[name] = {
            "metric": task.metric,
            "domain": task.domain,
            "labels": task.label_names,
            "examples": {
                "train": len(task.train.labels),
                "valid": len(task.valid.labels),
                "test": len(task.test.labels),
            },
            "majority_test": majority_baseline(task.metric, task.train.labels, task.test.labels),
            "seeds": {
                str(s): {"valid": recs[s]["valid"], "test": recs[s]["test"], "epoch": recs[s]["epoch"]}
                for s in seeds
            },
            "valid": statistics.fmean(valid),
            "valid_std": _std(valid),
            "test": statistics.fmean(test),
            "std": _std(test),
        }
    return {
        "model": model,
        "prompts": prompts,
        "seeds": seeds,
        "tasks": per_task,
        "average": statistics.fmean(t["test"] for t in per_task.values()),
    }


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(summary: dict) -> str:
    lines = [
        f"# Downstream fine-tuning of {summary['model']}",
        "",
        f"Prompts {'on' if summary['prompts'] else 'off'}; seeds {summary['seeds']}; the epoch is selected "
        "on "
        "valid, test is reported at that epoch (mean ± standard deviation over seeds).",
        "",
        "| task | metric | majority (test) | valid | test | test per seed |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in summary["tasks"].items():
        per_seed = ", ".join(f"{v['test']:.3f}" for v in t["seeds"].values())
        lines.append(
            f"| {name} | {t['metric']} | {t['majority_test']:.3f} | {t['valid']:.3f} ± {t['valid_std']:.3f} "
            f"| {t['test']:.3f} ± {t['std']:.3f} | {per_seed} |"
        )
    lines += ["", f"Average test over tasks: {summary['average']:.4f}"]
    return "\n".join(lines) + "\n"


def _error_text(error) -> str:
    return root_cause(error) if error else ""
