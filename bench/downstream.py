"""Downstream fine-tuning of the ELLE benchmark's final models on one real task per domain.

    python bench/downstream.py --runs /work/elle-out [--arch gpt2] [--seeds 0 1 2] [--train 1000] [--epochs 2]

For each method's final model from ``bench/elle_stream.py`` (``<runs>/<arch>-<method>/final_model``):
the baselines (naive, er, logit_kd, joint, elle_no_growth, scratch_large), elle and elle_no_prompts, plus
``elle`` fine-tuned with its prompts switched off (``elle_prompts_off``: the same weights, so the difference
is the prompt's alone), it runs
``ray-lifelong finetune``'s own ``run_finetune`` on the five tasks of ``configs/finetune/downstream.yaml``
(RTE, AG News, IMDB, ChemProt, ACL-ARC) with every seed: the epoch selected on valid, test reported.
Sized for 2 CPU cores: the first ``--train`` training examples of each task, ``--epochs`` epochs.

Writes bench/results/downstream.json as ``{arch: {method: {task: {"test": mean, "std": s}, "average": a}}}``
(plus each task's valid score, seeds and majority baseline) and downstream.md. The goals (``goals``) compare
ELLE as pre-trained, with its prompts, against every baseline: undecided unless all of them were fine-tuned,
or
where two averages are within the seed spread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, write

# method -> (run directory suffix, prompts switch: None = as the model was pre-trained)
METHODS = {
    "naive": ("naive", None),
    "er": ("er", None),
    "logit_kd": ("logit_kd", None),
    "joint": ("joint", None),
    "elle_no_growth": ("elle_no_growth", None),
    "scratch_large": ("scratch_large", None),
    "elle": ("elle", None),
    "elle_prompts_off": ("elle", False),
    "elle_no_prompts": ("elle_no_prompts", None),
}
# the methods ELLE's average is compared with: every baseline of the stream benchmark. ELLE is the model as
# pre-trained, fine-tuned with its prompts; elle_prompts_off and elle_no_prompts are its own variants.
RIVALS = ("naive", "er", "logit_kd", "joint", "elle_no_growth", "scratch_large")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True, help="bench/elle_stream.py's --out directory")
    ap.add_argument("--arch", nargs="+", default=["gpt2"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--train", type=int, default=1000, help="training examples per task")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--work", default=None, help="where the fine-tuning runs go (default: <runs>/downstream)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray

    from ray_lifelong.config import load_config
    from ray_lifelong.downstream.run import run_finetune

    runs = Path(args.runs).resolve()
    work = Path(args.work or runs / "downstream").resolve()
    ray.init(
        num_cpus=4,
        configure_logging=False,
        runtime_env={
            "env_vars": {
                k: os.environ[k]
                for k in ("HF_HUB_OFFLINE", "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_DATA_LOG_LEVEL")
            }
        },
    )
    results: dict = {}
    t0 = time.time()
    for arch in args.arch:
        results[arch] = {}
        for method in args.methods:
            suffix, prompts = METHODS[method]
            model = runs / f"{arch}-{suffix}"
            if not (model / "final_model" / "config.json").exists():
                print(f"[bench] {arch} {method}: no final model in {model}, skipped", flush=True)
                continue
            overrides = [
                str(REPO / "configs/finetune/downstream.yaml"),
                f"output_dir={work}",
                f"run_name={arch}-{method}",
                f"finetune.seeds=[{', '.join(map(str, args.seeds))}]",
                f"finetune.epochs={args.epochs}",
                f"finetune.lr={args.lr}",
                f"finetune.max_length={args.max_length}",
                f"finetune.max_concurrent={args.concurrent}",
                "scaling.num_workers=1",
                "scaling.cpus_per_worker=0.5",
            ]
            if prompts is not None:
                overrides.append(f"finetune.prompts={str(prompts).lower()}")
            cfg = load_config(None, overrides)
            for task in cfg.finetune.tasks:
                task.max_train_examples = args.train
                for split in ("train", "valid", "test"):  # the overlay's paths are relative to the repo
                    setattr(
                        task,
                        split,
                        [
                            p if Path(p).is_absolute() else str((REPO / p).resolve())
                            for p in getattr(task, split)
                        ],
                    )
            print(f"[bench] {arch} {method}: fine-tuning {model}", flush=True)
            s = run_finetune(cfg, model=str(model))
            results[arch][method] = {
                **{
                    name: {
                        "test": t["test"],
                        "std": t["std"],
                        "valid": t["valid"],
                        "majority_test": t["majority_test"],
                        "metric": t["metric"],
                        "seeds": t["seeds"],
                    }
                    for name, t in s["tasks"].items()
                },
                "average": s["average"],
                "prompts": s["prompts"],
            }
            report(results, args, time.time() - t0)  # after every method: an interrupted run keeps its part


def seed_averages(v: dict) -> list[float]:
    """A method's average over the tasks, per seed (the seeds every task has)."""
    tasks = [k for k in v if k not in ("average", "prompts")]
    seeds = sorted(set.intersection(*(set(v[t]["seeds"]) for t in tasks))) if tasks else []
    return [sum(v[t]["seeds"][s]["test"] for t in tasks) / len(tasks) for s in seeds]


def spread(v: dict) -> float:
    """Standard deviation over seeds of a method's task average (0 with fewer than two seeds)."""
    xs = seed_averages(v)
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _beats(a: dict, b: dict) -> bool | None:
    """True/False where the averages differ by more than the larger seed spread; None (undecided) within
    it."""
    margin = a["average"] - b["average"]
    if abs(margin) <= max(spread(a), spread(b)):
        return None
    return margin > 0


def goals(r: dict) -> dict:
    """The goals for one architecture. ``None`` (undecided) unless every method a goal compares with ran, or
    where the averages are within the seed spread (the larger standard deviation over seeds of the two).

    - ``elle_best_average``: ELLE (fine-tuned with its prompts, as pre-trained) has a higher average test
      score than every baseline in ``RIVALS``;
    - ``prompts_help_on_average``: ELLE with its prompts against the same weights fine-tuned without them.
    """
    out: dict = {"elle_best_average": None, "prompts_help_on_average": None}
    if "elle" not in r:
        return out
    e = r["elle"]
    if all(m in r for m in RIVALS):
        wins = [_beats(e, r[m]) for m in RIVALS]
        out["elle_best_average"] = False if False in wins else (None if None in wins else True)
    out["elle_margins"] = {
        m: {"margin": e["average"] - r[m]["average"], "spread": max(spread(e), spread(r[m]))}
        for m in RIVALS
        if m in r
    }
    if "elle_prompts_off" in r:
        out["prompts_help_on_average"] = _beats(e, r["elle_prompts_off"])
    return out


def report(results: dict, args, wall: float) -> None:
    goal = {arch: goals(r) for arch, r in results.items() if "elle" in r}
    lines = [
        "# Downstream fine-tuning of the ELLE benchmark's final models",
        "",
        (
            f"Tasks of configs/finetune/downstream.yaml (../shared/downstream), first {args.train} training "
            "examples, "
            f"{args.epochs} epochs, lr {args.lr}, max length {args.max_length}, seeds {args.seeds}; epoch "
            "selected on "
            f"valid, test mean ± std over seeds. Wall of this invocation {wall / 60:.0f} min on 2 cores "
            f"((task, seed) jobs finished by an earlier invocation are kept, not rerun)."
        ),
        "",
    ]
    for arch, r in results.items():
        if not r:
            continue
        tasks = [k for k in next(iter(r.values())) if k not in ("average", "prompts")]
        lines += [
            f"## {arch}",
            "",
            "| method | prompts | " + " | ".join(tasks) + " | average |",
            "|---|---|" + "---|" * (len(tasks) + 1),
        ]
        for m, v in r.items():
            lines.append(
                f"| {m} | {'on' if v['prompts'] else 'off'} | "
                + " | ".join(f"{v[t]['test']:.3f} ± {v[t]['std']:.3f}" for t in tasks)
                + f" | {v['average']:.4f} |"
            )
        first = next(iter(r.values()))
        lines += [
            "| majority class | | " + " | ".join(f"{first[t]['majority_test']:.3f}" for t in tasks) + " | |",
            "",
            *goal_lines(goal.get(arch), r),
            "",
        ]
    write("downstream", results, "\n".join(lines), {"goals": goal, "setup": {**vars(args), "wall_s": wall}})


def goal_lines(g: dict | None, r: dict) -> list[str]:
    """The goals as met / missed / undecided, with the margins and seed spreads behind them."""
    if g is None:
        return ["Goals: undecided (elle did not run)."]

    def word(v):
        return "undecided" if v is None else ("met" if v else "missed")

    absent = [m for m in RIVALS if m not in r]
    margins = ", ".join(
        f"{m} {v['margin']:+.4f} (spread {v['spread']:.4f})" for m, v in g["elle_margins"].items()
    )
    return [
        f"- elle_best_average: {word(g['elle_best_average'])}"
        + (f" ({', '.join(absent)} not fine-tuned)" if absent else "")
        + f"; ELLE's average minus each baseline's: {margins}.",
        f"- prompts_help_on_average: {word(g['prompts_help_on_average'])}.",
    ]


if __name__ == "__main__":
    main()
