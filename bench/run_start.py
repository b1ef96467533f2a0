"""How long `ray-lifelong run` takes before its first stage trains, for two checkouts side by side.

Each repetition runs the same config from a fresh directory with each code in turn (the order alternates
between repetitions: the machine is shared and noisy). The console's lines are timed as they arrive:

- ``ray``: to ``[ray] started a local cluster`` (imports, config, Ray's start);
- ``plan``: to ``[run] stages ...`` (the driver's work before its Ray Train run: tokenizer, validation
  rows, the stages' plans);
- ``stage``: to the first stage's start line (the Ray Train run's controller and worker group);
- ``wall``: to the command's exit;

and the run's results (the perplexity matrix and AP) are compared between the two codes.

    python bench/run_start.py --before CHECKOUT [--config demo] [--reps 3] [--name run_start]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARKS = {"ray": "[ray] started", "plan": "[run] stages", "stage": "] stage 1 of "}


def timed_run(code: Path, config: str, work: Path) -> dict:
    """``ray-lifelong run`` of the code in ``code``: seconds to each of :data:`MARKS` and to its exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "ray_lifelong", "run", str(code / "configs" / f"{config}.yaml"),
           f"output_dir={work / 'runs'}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    at, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        for key, mark in MARKS.items():
            if key not in at and mark in line:
                at[key] = round(time.perf_counter() - t0, 2)
    if proc.wait() != 0:
        raise RuntimeError(f"{code}: {config} failed ({proc.returncode}):\n{''.join(lines[-40:])}")
    at["wall"] = round(time.perf_counter() - t0, 2)
    res = json.loads(next((work / "runs").glob("*/results.json")).read_text())
    return {**at, "AP": res["AP"], "ppl_matrix": res["ppl_matrix"]}


def commit(code: Path) -> str:
    return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the earlier code")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="run_start")
    args = ap.parse_args()
    codes = {"before": args.before.resolve(), "now": REPO}
    runs: dict[str, list[dict]] = {k: [] for k in codes}
    for rep in range(args.reps):
        for side in (("before", "now") if rep % 2 == 0 else ("now", "before")):
            with tempfile.TemporaryDirectory() as d:
                runs[side].append(timed_run(codes[side], args.config, Path(d)))
                print(side, {k: v for k, v in runs[side][-1].items() if k != "ppl_matrix"}, flush=True)

    def stats(side: str, key: str) -> dict:
        xs = [r[key] for r in runs[side]]
        return {"median": round(statistics.median(xs), 2), "min": min(xs), "max": max(xs)}

    keys = (*MARKS, "wall")
    summary = {side: {k: stats(side, k) for k in keys} for side in codes}
    same = all(r["ppl_matrix"] == runs["before"][0]["ppl_matrix"] for side in codes for r in runs[side])
    payload = {"config": args.config, "reps": args.reps, "before": commit(codes["before"]),
               "now": commit(REPO), "summary": summary, "same_results": same, "runs": runs}
    lines = [
        f"# Time to a run's first stage: `ray-lifelong run configs/{args.config}.yaml`, before vs now\n",
        f"{os.cpu_count()} CPUs; {args.reps} runs per code, alternating, each from a fresh directory; "
        "seconds from the command's start to the console line (median, min-max). before = "
        f"{payload['before']}, now = {payload['now']}.\n",
        "| code | Ray started | driver ready (`[run] stages`) | first stage's start | exit |",
        "|---|---|---|---|---|",
    ]
    for side in codes:
        cells = [f"{m['median']} ({m['min']}-{m['max']})" for m in (summary[side][k] for k in keys)]
        lines.append(f"| {side} | " + " | ".join(cells) + " |")
    lines += ["", f"Same perplexity matrix in every run of both codes: {same}."]
    write(args.name, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
