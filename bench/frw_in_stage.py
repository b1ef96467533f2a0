"""What running ELLE's function-recovering warmup (FRW) inside its stage's Ray Train run saves, against the
earlier layout that ran it as a Ray Train run of its own before each grown stage.

The same ELLE config (the CPU stream's growth schedule cut to three corpus domains, pretokenized, so both
read the same packed rows) runs through ``ray-lifelong run`` in two checkouts: the baseline commit, where
each growth starts two Ray Train runs (FRW, then the domain), and this one (one run per stage). The runs
alternate baseline / current ``--repeats`` times (the machine is shared and noisy: compare within a pair).
Reported per run: wall time of the command, time inside Ray Train runs, the number of Ray Train runs, the
FRW phases' and stages' wall time, and the final AP (not expected to be equal: the warmup now draws its
batches from the memory rows the workers hold, in another order than the old shuffled memory stream).

    python bench/frw_in_stage.py [--baseline 8839704] [--repeats 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, write
from bench.pretokenize import bench_config


def run(checkout: Path, config: Path, work: Path, name: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "RAY_DATA_LOG_LEVEL": "WARNING"}
    shutil.rmtree(work / name, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ray_lifelong", "run", str(config), f"run_name={name}"],
                          check=False, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads((work / name / "results.json").read_text())
    parts = [s for st in res["stages"] for s in [st, st.get("frw")] if s]
    runs = len(list((work / name / "stages").glob("*/stage.json")))  # one marker per Ray Train run
    return {"wall_s": round(wall, 1), "in_stages_s": round(sum(p["wall_time_s"] for p in parts), 1),
            "ray_train_runs": runs, "steps": sum(p["steps"] for p in parts),
            "stage_wall_s": [round(st["stage_wall_time_s"], 1) for st in res["stages"]],
            "frw_wall_s": [round(st["frw"]["wall_time_s"], 1) for st in res["stages"] if "frw" in st],
            "final_AP": round(res["AP"][-1], 2)}


def table(r: dict) -> str:
    lines = [
        (
            f"# FRW inside its stage's Ray Train run ({r['arch']}, {' -> '.join(r['domains'])}, "
            f"{r['steps']} steps "
            f"per stage + {r['frw_steps']} FRW steps after each growth; {r['ray_cpus']} Ray CPUs on "
            f"{r['machine_cpus']} cores)"
        ),
        "",
        (
            f"Baseline: commit `{r['baseline']}` (FRW a Ray Train run of its own); current: this checkout. "
            "Runs alternate; each pair ran back to back."
        ),
        "",
        (
            "| pair | layout | wall (s) | in Ray Train runs (s) | Ray Train runs | stage walls, FRW "
            "included (s) "
            "| final AP |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(r["pairs"]):
        for layout in ("baseline", "current"):
            m = p[layout]
            lines.append(
                f"| {i + 1} | {layout} | {m['wall_s']} | {m['in_stages_s']} | {m['ray_train_runs']} | "
                f"{' / '.join(map(str, m['stage_wall_s']))} | {m['final_AP']} |"
            )
        lines.append(f"| {i + 1} | ratio baseline / current | **{p['wall_ratio']}x** | | | | |")
    lines += [
        "",
        (
            f"Mean wall time saved per run: {r['mean_saved_s']} s for {r['growths']} growths "
            f"({r['saved_per_growth_s']} s per growth)."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--baseline", default="8839704", help="a commit that ran FRW as a Ray Train run of its own"
    )
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "bert"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--frw-steps", type=int, default=10)
    ap.add_argument("--domains", nargs="+", default=["wb", "news", "reviews"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-frw"))
    args = ap.parse_args()
    from ray_lifelong.config import save_config
    from ray_lifelong.data.run_tokenizer import prepare_tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    base = args.work / "baseline-checkout"
    if not base.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=REPO, check=True)
    cfg = bench_config(
        args.arch,
        args.work,
        args.domains,
        [
            str(REPO / "configs/methods/elle.yaml"),
            f"train.steps={args.steps}",
            f"continual.frw.steps={args.frw_steps}",
            "continual.frw.warmup_steps=2",
            "data.pretokenize=true",
            f"data.packed_path={args.work / 'packed'}",
            f"ray.num_cpus={args.num_cpus}",
            f"train.log_every={max(1, args.steps // 3)}",
            f"train.checkpoint_every={args.steps}",
        ],
    )
    cfg.tokenizer.path = prepare_tokenizer(cfg, args.work / f"tokenizer-{args.arch}")
    config = args.work / "elle.yaml"
    save_config(cfg, config)
    # the domains packed once first: every run then reads the same packed rows and none pays for packing
    subprocess.run(
        [sys.executable, "-m", "ray_lifelong", "pack", str(config)],
        cwd=REPO,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    pairs = []
    for k in range(args.repeats):
        pair = {
            layout: run(checkout, config, args.work, f"{layout}-{k}")
            for layout, checkout in (("baseline", base), ("current", REPO))
        }
        pair["wall_ratio"] = round(pair["baseline"]["wall_s"] / pair["current"]["wall_s"], 2)
        print(json.dumps(pair), flush=True)
        pairs.append(pair)
    growths = len(pairs[0]["current"]["frw_wall_s"])
    saved = sum(p["baseline"]["wall_s"] - p["current"]["wall_s"] for p in pairs) / len(pairs)
    result = {
        "arch": args.arch,
        "domains": args.domains,
        "steps": args.steps,
        "frw_steps": args.frw_steps,
        "baseline": args.baseline,
        "ray_cpus": args.num_cpus,
        "machine_cpus": os.cpu_count(),
        "pairs": pairs,
        "growths": growths,
        "mean_saved_s": round(saved, 1),
        "saved_per_growth_s": round(saved / max(growths, 1), 1),
    }
    write("frw_in_stage", result, table(result))


if __name__ == "__main__":
    main()
