"""``ray-lifelong ki``: a Knowledge Inheritance experiment as three ordinary runs, then a comparison.

1. ``<run>-teacher``: the small teacher (``ki.teacher_model``) trained on the configured domains;
2. ``<run>-ki``: the configured student, distilling from the teacher (``ki.inherit`` schedule);
3. ``<run>-baseline``: the same student without a teacher (same tokenizer, data order and seed).

Outputs under ``<output_dir>/<run_name>/``: the three run directories, ``ki_results.json``,
``ki_report.md`` and ``ki_curves.png`` (validation loss against steps and against FLOPs, with the
teacher's forward FLOPs charged to KI; the teacher's own training is not charged, as in the paper).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from ray_lifelong.config import plan
from ray_lifelong.config.schema import LifelongConfig
from ray_lifelong.data.demo import prepare_demo
from ray_lifelong.data.run_tokenizer import prepare_tokenizer
from ray_lifelong.data.tokenizer import load_tokenizer
from ray_lifelong.distill import inheritance_rate
from ray_lifelong.flops import sequence_flops
from ray_lifelong.layout import run_layout
from ray_lifelong.pipeline import run_lifelong
from ray_lifelong.report import markdown_table
from ray_lifelong.savings import cost_to_reach as rule


def variants(cfg: LifelongConfig, tokenizer_dir: str) -> dict[str, LifelongConfig]:
    """The teacher, KI-student and baseline configs derived from one experiment config."""
    base = run_layout(cfg).root
    out = {}
    teacher = copy.deepcopy(cfg)
    teacher.model = copy.deepcopy(cfg.ki.teacher_model)
    teacher.model.arch = cfg.model.arch
    for d in teacher.data.domains:
        d.steps, d.teacher, d.grow = cfg.ki.teacher_steps, None, None
        d.lr = cfg.ki.teacher_lr or d.lr
    out["teacher"] = teacher
    student = copy.deepcopy(cfg)
    for d in student.data.domains:
        d.teacher = copy.deepcopy(cfg.ki.inherit)
        d.teacher.path = str(base / f"{cfg.run_name}-teacher")
    out["ki"] = student
    if cfg.ki.baseline:
        out["baseline"] = copy.deepcopy(cfg)
    for name, c in out.items():
        c.output_dir, c.run_name = str(base), f"{cfg.run_name}-{name}"
        c.tokenizer.path = tokenizer_dir
    return out


def run_ki_experiment(cfg: LifelongConfig, *, resume: bool = False) -> dict:
    base = run_layout(cfg).root
    base.mkdir(parents=True, exist_ok=True)
    prepare_demo(cfg)
    tok_dir = prepare_tokenizer(cfg, base / "tokenizer")
    results = {}
    for name, c in variants(cfg, tok_dir).items():
        lay = run_layout(c)
        done = lay.results.exists()
        print(f"[ki] {name}: {'already finished' if done and resume else 'training'} ({lay.root})")
        results[name] = json.loads(lay.results.read_text()) if done and resume else \
            run_lifelong(c, resume=resume)
    summary = compare(cfg, results, tok_dir)
    (base / "ki_results.json").write_text(json.dumps(summary, indent=1))
    write_ki_report(summary, base)
    print(f"[ki] done: {base}/ki_report.md")
    return summary


def curve(result: dict, per_step_flops: float, teacher_per_step: float = 0.0, ki_active=lambda s: False):
    """Validation loss (mean ln PPL over the domains trained so far) at every evaluation, with steps and
    cumulative FLOPs (training + teacher forward while the teacher ran)."""
    points, offset, flops_offset = [], 0, 0.0
    names = result["domains"]
    for i, stage in enumerate(result["stages"]):
        for e in stage["evals"]:
            step = offset + e["step"]
            teacher = teacher_per_step * sum(1 for k in range(e["step"]) if ki_active(k))
            points.append({"step": step, "flops": flops_offset + e["step"] * per_step_flops + teacher,
                           "valid_loss": sum(math.log(e["ppl"][d]) for d in names[:i + 1]) / (i + 1)})
        offset += stage["steps"]
        flops_offset += stage["train_flops"] + stage.get("teacher_flops", 0.0)
    return points


def cost_to_reach(points: list[dict], target: float, key: str) -> float | None:
    """``key`` (steps or FLOPs) at the first evaluation at or below ``target``, interpolated from the one
    before
    it; the first evaluation's own cost if it is already there (``ray_lifelong.savings`` states the rule)."""
    return rule(points, target, key)


def compare(cfg: LifelongConfig, results: dict, tok_dir: str) -> dict:
    vocab, m, tm = len(load_tokenizer(tok_dir)), cfg.model, cfg.ki.teacher_model
    S, bs = cfg.data.seq_len, cfg.train.batch_size
    per_token = {"vocab": vocab, "seq_len": S, "arch": m.arch, "mlm_probability": cfg.data.mlm_probability}
    student_step = bs * sequence_flops(m, **per_token)
    teacher_step = bs * sequence_flops(tm, train=False, **per_token)
    inh = cfg.ki.inherit
    n_ki = plan.ki_steps(inh, plan.stage_plans(cfg)[0].steps)

    def active(k: int) -> bool:
        return inheritance_rate(k, schedule=inh.schedule, steps=n_ki, alpha0=inh.alpha0) > 0

    curves = {"ki": curve(results["ki"], student_step, teacher_step, active)}
    if "baseline" in results:
        curves["baseline"] = curve(results["baseline"], student_step)
    curves["teacher"] = curve(results["teacher"], bs * sequence_flops(tm, **per_token))
    out = {
        "arch": m.arch,
        "curves": curves,
        "n_ki": n_ki,
        "schedule": inh.schedule,
        "alpha0": inh.alpha0,
        "temperature": inh.temperature,
        "top_k": inh.top_k,
        "final_loss": {k: v[-1]["valid_loss"] for k, v in curves.items() if v},
    }
    if "baseline" in curves and curves["baseline"]:
        target = curves["baseline"][-1]["valid_loss"]
        base_steps = cost_to_reach(curves["baseline"], target, "step")
        base_flops = cost_to_reach(curves["baseline"], target, "flops")
        ki_steps = cost_to_reach(curves["ki"], target, "step")
        ki_flops = cost_to_reach(curves["ki"], target, "flops")
        out.update(
            {
                "target_loss": target,
                "saved_step_matched": None if ki_steps is None else 1 - ki_steps / base_steps,
                "saved_flop_matched": None if ki_flops is None else 1 - ki_flops / base_flops,
            }
        )
    return out


def write_ki_report(summary: dict, out: Path) -> None:
    rows = [[k, v] for k, v in summary["final_loss"].items()]
    lines = [
        "# Knowledge Inheritance",
        "",
        f"{summary['arch']}: schedule {summary['schedule']}, N_KI {summary['n_ki']}, alpha0 "
        f"{summary['alpha0']}, T {summary['temperature']}, top_k {summary['top_k']}.",
        "",
        markdown_table(["run", "final validation loss (mean ln PPL)"], rows),
    ]
    if "target_loss" in summary:
        fmt = lambda x: "not reached" if x is None else f"{x:.1%}"  # noqa: E731
        lines += [
            "",
            f"Compute KI saves to reach the baseline's final loss {summary['target_loss']:.3f}: "
            f"step-matched {fmt(summary['saved_step_matched'])}, FLOP-matched (teacher forward charged) "
            f"{fmt(summary['saved_flop_matched'])}.",
        ]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, pts in summary["curves"].items():
            axes[0].plot([p["step"] for p in pts], [p["valid_loss"] for p in pts], label=name)
            axes[1].plot([p["flops"] / 1e12 for p in pts], [p["valid_loss"] for p in pts], label=name)
        axes[0].set_xlabel("step")
        axes[1].set_xlabel("cumulative TFLOPs (teacher forward charged to KI)")
        for ax in axes:
            ax.set_ylabel("validation loss")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "ki_curves.png", dpi=100)
        plt.close(fig)
        lines += ["", "![curves](ki_curves.png)"]
    except ImportError:
        pass
    (out / "ki_report.md").write_text("\n".join(lines) + "\n")
