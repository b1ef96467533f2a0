"""Goal verdicts and derived figures recomputed from the result files in bench/results, without training.

    python bench/verdicts.py [--write-meta]

Prints, from the JSON files alone and by the same rules the benchmarks use (ray_lifelong.savings, the goal
checks of elle_stream.py and downstream.py):
- KI (ki.json, ki_paper_setting.json): the savings, whether the teacher ends better than the student
baseline, what the teacher alone
  saves, and the saving with the target moved by +-0.02 nats;
- the KI sweep (ki_sweep.json): the step- and FLOP-matched savings (teacher charged), N_KI as it acted;
- growth (growth.json with growth_small400.json, growth_per_phase_lr.json): every run's saving, the small
  model alone included;
- ELLE on the stream (elle_stream*.json): the goals, undecided where a compared method did not run;
- downstream (downstream.json): the goals with margins and seed spreads;
- the backbone's ray_overhead.json and data_throughput.json goals.

``--write-meta`` writes the recomputed goals into the ``*.meta.json`` files beside the ELLE and downstream
results (their ``setup`` is kept), so that a goal flag never says more than its result file shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS
from ray_lifelong import savings as rule


def _pct(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.1%}"


def _bound(s: dict, kind: str) -> str:
    v = s[f"saved_{kind}"]
    return _pct(v) if v is None or s[f"reached_{kind}"] else f"not reached (< {v:.1%})"


def ki_lines(path: Path) -> list[str]:
    from bench.ki import moved_text, teacher_context

    d = json.loads(path.read_text())
    lines = [f"## {path.name}"]
    for arch in d.get("setup", {}).get("arch", []):
        r = d[arch]
        c = r["curves"]
        s = rule.savings(c["baseline"], c["ki"])
        t = teacher_context(c["teacher"], c["baseline"], c["ki"])
        moved = ", ".join(
            f"{k} nats {moved_text(r, float(k), v)}" for k, v in t["saved_steps_target_moved"].items()
        )
        lines.append(
            f"- {arch}: saved steps {_bound(s, 'step_matched')}, FLOPs (teacher charged) "
            f"{_bound(s, 'flop_matched')}; teacher {r['teacher_final_loss']:.3f} vs. baseline "
            f"{r['baseline_final_loss']:.3f} ({'better' if t['teacher_better_than_baseline'] else 'worse'}); "
            f"teacher alone saves {_pct(t['teacher_alone_saved_flops'])} of the FLOPs; "
            f"steps saved with the target moved: "
            f"{moved}"
        )
    return lines


def ki_sweep_lines(path: Path) -> list[str]:
    from bench.ki_sweep import n_ki_shown, with_flops

    d = json.loads(path.read_text())
    steps = d["steps"]
    paper = {
        "ki.inherit.schedule": "linear",
        "ki.inherit.steps": max(1, round(0.3 * steps)),
        "ki.inherit.alpha0": 1.0,
        "ki.inherit.temperature": 2.0,
    }
    values = {"best": d["verdict"]["best_values"], "paper": paper, "no_ki": {}}
    curves = {n: with_flops(r["curve"], r, steps, values[n]) for n, r in d["runs"].items()}
    target = curves["no_ki"][-1]["valid_loss"]
    ref = {k: rule.cost_to_reach(curves["no_ki"], target, k) for k in ("step", "flops")}
    lines = [f"## {path.name}"]
    for n, c in curves.items():
        v = values[n]
        shown = (
            f"{v['ki.inherit.schedule']}, N_KI {n_ki_shown(v, steps)}, alpha0 {v['ki.inherit.alpha0']:.2f}, "
            f"T {v['ki.inherit.temperature']}"
            if v
            else "no teacher"
        )
        lines.append(
            f"- {n} ({shown}): final {c[-1]['valid_loss']:.4f}; saved to no_ki's final loss: steps "
            f"{_pct(rule.saved_fraction(rule.cost_to_reach(c, target, 'step'), ref['step']))}, FLOPs "
            "(teacher charged) "
            f"{_pct(rule.saved_fraction(rule.cost_to_reach(c, target, 'flops'), ref['flops']))}"
        )
    return lines


def growth_lines(path: Path, earlier: Path | None) -> list[str]:
    from bench.growth import training_lines

    d = json.loads(path.read_text())
    if "training" not in d:
        return [f"## {path.name}", "- no training comparison"]
    e = json.loads(earlier.read_text())["training"] if earlier and earlier.exists() else None
    return [f"## {path.name}", *training_lines(d["training"], e)]


def elle_goals(path: Path) -> dict:
    from bench.elle_stream import goals

    return {arch: goals(r) for arch, r in json.loads(path.read_text()).items()}


def elle_lines(path: Path) -> list[str]:
    from bench.elle_stream import goal_lines

    lines = [f"## {path.name}"]
    for arch, r in json.loads(path.read_text()).items():
        lines += [f"{arch}:", *goal_lines(r)]
    return lines


def downstream_goals(path: Path) -> dict:
    from bench.downstream import goals

    return {arch: goals(r) for arch, r in json.loads(path.read_text()).items() if "elle" in r}


def downstream_lines(path: Path) -> list[str]:
    from bench.downstream import goal_lines, goals

    lines = [f"## {path.name}"]
    for arch, r in json.loads(path.read_text()).items():
        lines += [f"{arch}:", *goal_lines(goals(r) if "elle" in r else None, r)]
    return lines


def backbone_lines() -> list[str]:
    lines = []
    o = RESULTS / "ray_overhead.json"
    if o.exists():
        d = json.loads(o.read_text())
        ratios = {
            f"{w['workload']} {kind}": w[key]
            for w in d["workloads"]
            for kind, key in (
                ("pre-tokenized", "ray_vs_torch_steps_ratio"),
                ("streaming", "ray_streaming_vs_torch_steps_ratio"),
            )
        }
        worst = min(ratios.values())
        lines += [
            "## ray_overhead.json",
            f"- goal {d['goal']}: {'met' if worst >= 0.95 else 'missed'}; "
            + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()),
        ]
    t = RESULTS / "data_throughput.json"
    if t.exists():
        d = json.loads(t.read_text())
        lines += [
            "## data_throughput.json",
            (
                f"- goal {d['goal']}: {'met' if d['wait_fraction'] < 0.05 else 'missed'} "
                f"(highest wait fraction {d['wait_fraction']:.3f})"
            ),
        ]
    return lines


def write_meta(name: str, goals: dict) -> None:
    meta = RESULTS / f"{name}.meta.json"
    d = json.loads(meta.read_text()) if meta.exists() else {}
    d["goals"] = goals
    meta.write_text(json.dumps(d, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--write-meta", action="store_true", help="write the recomputed goals into the *.meta.json files"
    )
    args = ap.parse_args()
    lines: list[str] = []
    for name in ("ki.json", "ki_paper_setting.json"):
        if (RESULTS / name).exists():
            lines += ki_lines(RESULTS / name)
    if (RESULTS / "ki_sweep.json").exists():
        lines += ki_sweep_lines(RESULTS / "ki_sweep.json")
    if (RESULTS / "growth.json").exists():
        lines += growth_lines(RESULTS / "growth.json", RESULTS / "growth_small400.json")
    if (RESULTS / "growth_per_phase_lr.json").exists():
        lines += growth_lines(RESULTS / "growth_per_phase_lr.json", None)
    for path in sorted(RESULTS.glob("elle_stream*.json")):
        if path.name.endswith(".meta.json"):
            continue
        lines += elle_lines(path)
        if args.write_meta:
            write_meta(path.stem, elle_goals(path))
    if (RESULTS / "downstream.json").exists():
        lines += downstream_lines(RESULTS / "downstream.json")
        if args.write_meta:
            write_meta("downstream", downstream_goals(RESULTS / "downstream.json"))
    lines += backbone_lines()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
