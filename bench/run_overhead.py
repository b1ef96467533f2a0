"""Where a run's wall time goes: the demo and the ELLE demo end to end on Ray, beside the same work in a
plain in-process PyTorch loop.

For each config, in one invocation (the machine is shared and noisy, so the two sides run back to back):

- **Ray**: ``ray-lifelong run CONFIG`` as a user starts it, in a fresh directory (demo data, tokenizer,
  Ray's start and shutdown included); the stages' own timings from ``results.json``: the start (the first
  stage of a Ray Train run: ``fit()`` called to the workers' loop; a later one: the stage before ended to
  its loop), the first micro-batch, training, waiting for data, validation, reports (checkpoints), and the
  driver's memory writing.
- **plain**: the same demo data and tokenizer training (the project's functions, no Ray), the same rows
  (tokenized and packed in-process, prompts included), models, growth, function-recovering warmup, replay,
  steps, batch, optimizer and schedule, and the same validation, in one process.

The ratio ``wall_s / plain_s`` is what Ray's orchestration costs a run of this size; ``fixed_s_per_stage``
is a stage's wall time less its training compute (what is not training), averaged over the stages (the
first carries the worker group's start); ``fixed_s_later_stages`` the same over the stages after the first.
One timing per side: the figures are a profile, not a claim of a difference between two codes.

    python bench/run_overhead.py [--configs demo elle_demo] [--name run_overhead]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write  # noqa: E402
from ray_lifelong.config.load import load_config  # noqa: E402
from ray_lifelong.config.plan import stage_plans  # noqa: E402
from ray_lifelong.data.demo import prepare_demo  # noqa: E402
from ray_lifelong.data.memory import canonical_rows, replay_count, replay_draw, select_rows  # noqa: E402
from ray_lifelong.data.run_tokenizer import prepare_tokenizer
from ray_lifelong.data.sources import resolve_sources  # noqa: E402
from ray_lifelong.data.stream import TokenizePack, file_rows  # noqa: E402
from ray_lifelong.data.tokenizer import load_tokenizer, prompt_token  # noqa: E402
from ray_lifelong.models.build import LMObjective, build_model, lm_loss  # noqa: E402
from ray_lifelong.stage.grow import grow_model  # noqa: E402
from ray_lifelong.stage.schedule import lr_multiplier  # noqa: E402
from ray_lifelong.stage.step import Masker, build_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PHASE_KEYS = ("start_s", "first_batch_s", "compute_s", "data_wait_s", "eval_s", "checkpoint_s")


def ray_run(config: str, work: Path, code: Path = REPO, overrides: tuple[str, ...] = ()) -> dict:
    """``ray-lifelong run`` of the code in ``code`` in ``work`` (a fresh directory); its wall time and its
    stages' timings (an earlier code without per-phase timings: training compute from its step history)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "ray_lifelong", "run", str(code / "configs" / f"{config}.yaml"),
           f"output_dir={work / 'runs'}", *overrides]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise RuntimeError(f"{config} failed ({proc.returncode}):\n{tail}")
    res = json.loads(next((work / "runs").glob("*/results.json")).read_text())
    stages = []
    for s in res["stages"]:
        phases = [s] + ([s["frw"]] if "frw" in s else [])
        t = {k: round(sum((p.get("timings") or {}).get(k) or 0.0 for p in phases), 2) for k in PHASE_KEYS}
        t["first_batch_s"] = round((s.get("timings") or {}).get("first_batch_s") or 0.0, 2)  # the domain's
        if not s.get("timings"):
            t["compute_s"] = round(sum((p["history"] or [{}])[-1].get("compute_s", 0.0) for p in phases), 2)
        t["wall_s"] = round(s["stage_wall_time_s"], 2)
        t["fixed_s"] = round(t["wall_s"] - t["compute_s"], 2)
        stages.append({"domain": s["domain"], **t})
    mem = [round(m.get("write_s", 0.0), 2) for m in res.get("memories", [])]
    console = (proc.stdout + proc.stderr).splitlines()
    return {"wall_s": round(wall, 1), "stages": stages, "memory_write_s": mem, "AP": res["AP"],
            "console_lines": len(console), "console": console}


def domain_rows(tok_dir: str, cfg, index: int, split: str) -> torch.Tensor:
    """A domain's packed rows as the Ray stream makes them (one tokenizer actor: the whole stream packed)."""
    dom = cfg.data.domains[index]
    prompts = {index: prompt_token(dom.name)} if cfg.continual.prompts else None
    udf = TokenizePack(tok_dir, cfg.data.seq_len, cfg.model.arch, prompts=prompts)
    out = [rows["input_ids"]
           for f in resolve_sources(dom.train if split == "train" else dom.valid, what="bench")
           for rows in file_rows(udf, f, index, dom, cfg.data)]
    return torch.from_numpy(np.concatenate(out).astype(np.int64))


def plain_run(config: str, work: Path, threads: int, overrides: tuple[str, ...] = ()) -> dict:
    """The same run in one process, no Ray: data, tokenizer, stages (growth, warmup, replay), validation."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(work)  # the demo's data paths are relative to where the run starts, as for the Ray run
    try:
        cfg = load_config(str(REPO / "configs" / f"{config}.yaml"),
                          [f"output_dir={work / 'runs'}", *overrides])
        prepare_demo(cfg)
        tok_dir = prepare_tokenizer(cfg, work / "tokenizer")
        tok = load_tokenizer(tok_dir)
        n = len(cfg.data.domains)
        train = [domain_rows(tok_dir, cfg, i, "train") for i in range(n)]
        valid = [domain_rows(tok_dir, cfg, i, "valid")[: cfg.data.eval_max_sequences] for i in range(n)]
    finally:
        os.chdir(cwd)
    prep = time.perf_counter() - t0
    t, rp = cfg.train, cfg.continual.replay
    masker = Masker(tok, cfg.data.mlm_probability, cfg.model.arch)
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, len(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        seed=t.seed).to(device)
    memories: list[torch.Tensor] = []
    matrix = []
    for plan in stage_plans(cfg):
        i, grow = plan.index, cfg.data.domains[plan.index].grow
        if grow is not None and i > 0:
            model, *_ = grow_model(model.cpu(), grow, seed=t.seed + i, train=t, lr=plan.lr,
                                     optimizer_state=None, build_optimizer=build_optimizer)
            model = model.to(device)
        if plan.frw_steps:
            pool = torch.cat(memories)
            order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(t.seed + i))
            rows = pool[order].repeat(plan.frw_steps * plan.batch_size // len(pool) + 1, 1)
            _steps(model, masker, cfg, rows, plan.frw_steps, plan.batch_size, cfg.continual.frw.lr or plan.lr,
                   warmup=cfg.continual.frw.warmup_steps, decay="constant")
        reps = plan.steps * plan.batch_size // len(train[i]) + 1
        _steps(model, masker, cfg, train[i].repeat(reps, 1), plan.steps, plan.batch_size, plan.lr,
               warmup=int(t.warmup_ratio * plan.steps), decay=t.lr_decay,
               memory=memories if rp.enabled and memories else None)
        matrix.append([_ppl(model, masker, v, t.micro_batch_size) for v in valid])
        if rp.enabled and i < n - 1:
            keep = select_rows({"input_ids": train[i].numpy()}, fraction=rp.memory_fraction, seed=t.seed + i)
            memories.append(canonical_rows(torch.from_numpy(keep["input_ids"])))
    return {"plain_s": round(time.perf_counter() - t0, 1), "prepare_s": round(prep, 1),
            "ppl_matrix": matrix}


def _steps(model, masker, cfg, rows, steps, batch, lr, *, warmup, decay, memory=None) -> None:
    t = cfg.train
    obj = LMObjective(model).train()
    opt = build_optimizer(model, lr, t)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(
        s, steps, warmup=warmup, decay=decay, min_ratio=t.min_lr_ratio))
    micro = t.micro_batch_size
    for step in range(steps):
        for m in range(batch // micro):
            ids = rows[(step * batch + m * micro):(step * batch + (m + 1) * micro)].clone()
            gen = torch.Generator().manual_seed(t.seed + 7919 * step + m)
            if memory:  # the last k rows replaced by memory rows, as the stage's replay does
                k = replay_count(len(ids), cfg.continual.replay.ratio, gen)
                which, r = replay_draw([len(p) for p in memory], k, gen, cfg.continual.replay.weighting)
                for j, (w, row) in enumerate(zip(which.tolist(), r.tolist())):
                    ids[len(ids) - k + j] = memory[w][row]
            inputs, labels = masker(ids, gen)
            device = next(model.parameters()).device
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" and t.bf16):
                logits, targets = obj(inputs.to(device), labels.to(device))
            (lm_loss(logits, targets) / (batch // micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


@torch.no_grad()
def _ppl(model, masker, valid: torch.Tensor, micro: int) -> float:
    obj = LMObjective(model).eval()
    tot, n = 0.0, 0
    for i in range(0, len(valid), micro):
        inputs, labels = masker(valid[i : i + micro], None, fixed=True)
        device = next(model.parameters()).device
        logits, targets = obj(inputs.to(device), labels.to(device))
        tot += float(lm_loss(logits.float(), targets, reduction="sum"))
        n += targets.numel()
    model.train()
    return float(np.exp(tot / n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["demo", "elle_demo"])
    ap.add_argument("--name", default="run_overhead", help="result files bench/results/<name>.{json,md}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides for both sides, e.g. "
                    "scaling.use_gpu=true on a GPU node")
    ap.add_argument("--before", type=Path, default=None,
                    help="a checkout of an earlier commit: its Ray run of each config too, in the same "
                    "invocation")
    args = ap.parse_args()
    payload, consoles, before = {}, {}, {}
    for config in args.configs:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            if args.before is not None:
                with tempfile.TemporaryDirectory() as c:
                    old = ray_run(config, Path(c), args.before.resolve(), tuple(args.set))
                old.pop("console")
                before[config] = {"wall_s": old["wall_s"], "stages": old["stages"],
                                  "fixed_s_per_stage": round(sum(s["fixed_s"] for s in old["stages"])
                                                             / len(old["stages"]), 1),
                                  "console_lines": old["console_lines"], "AP": old["AP"]}
            ray = ray_run(config, Path(a), overrides=tuple(args.set))
            plain = plain_run(config, Path(b), args.threads, tuple(args.set))
        consoles[config] = ray.pop("console")
        stages = ray["stages"]
        payload[config] = {
            "wall_s": ray["wall_s"],
            "plain_s": plain["plain_s"],
            "ratio_to_plain": round(ray["wall_s"] / plain["plain_s"], 2),
            "fixed_s_per_stage": round(sum(s["fixed_s"] for s in stages) / len(stages), 1),
            "fixed_s_later_stages": round(sum(s["fixed_s"] for s in stages[1:]) / max(1, len(stages) - 1), 1),
            "stages": stages,
            "memory_write_s": ray["memory_write_s"],
            "plain_prepare_s": plain["prepare_s"],
            "console_lines": ray["console_lines"],
            "AP": ray["AP"],
        }
    goals = {c: {"ratio_within_2x": p["ratio_to_plain"] <= 2.0,
                 "fixed_under_5s": p["fixed_s_per_stage"] < 5.0} for c, p in payload.items()}
    if "demo" in payload:
        goals["demo"]["wall_under_75s"] = payload["demo"]["wall_s"] < 75.0
    lines = [
        "# Run overhead: Ray end to end vs. the same work in a plain PyTorch loop\n",
        f"{os.cpu_count()} CPUs; one timing per side, back to back in one invocation (a profile, no spread). "
        "Ray: `ray-lifelong run` from a fresh directory (Ray's start included). Plain: the same demo data, "
        "tokenizer, rows, models, growth, warmup, replay, steps and validation in one process. "
        "fixed = a stage's wall time less its training compute.\n",
        "| config | Ray wall s | plain s | ratio | fixed s / stage | fixed s / later stage | console lines |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, p in payload.items():
        if c in before:
            b = before[c]
            ratio = b["wall_s"] / p["plain_s"]
            later = [s["fixed_s"] for s in b["stages"][1:]]
            lines.append(f"| {c}, before | {b['wall_s']} | {p['plain_s']} | {ratio:.2f} | "
                         f"{b['fixed_s_per_stage']} | {sum(later) / max(1, len(later)):.1f} | "
                         f"{b['console_lines']} |")
        lines.append(f"| {c}{', now' if c in before else ''} | {p['wall_s']} | {p['plain_s']} | "
                     f"{p['ratio_to_plain']} | {p['fixed_s_per_stage']} | {p['fixed_s_later_stages']} | "
                     f"{p['console_lines']} |")
    lines += ["", "Per stage, current code (seconds; start = `fit()` called, or the stage before ended, to "
              "the stage's loop; first_batch from the stage's loop):", "",
              "| config | stage | wall | " + " | ".join(k[:-2] for k in PHASE_KEYS) + " | fixed |",
              "|---|---|---|" + "---|" * len(PHASE_KEYS) + "---|"]
    for c, p in payload.items():
        for s in p["stages"]:
            lines.append(f"| {c} | {s['domain']} | {s['wall_s']} | "
                         + " | ".join(str(s[k]) for k in PHASE_KEYS) + f" | {s['fixed_s']} |")
    lines += ["", "Goals: " + "; ".join(
        f"{c}: " + ", ".join(f"{g} **{'met' if ok else 'missed'}**" for g, ok in gs.items())
        for c, gs in goals.items())]
    write(args.name, payload, "\n".join(lines),
          meta={"goals": goals, "consoles": consoles, "before": before,
                "before_code": str(args.before) if args.before else None})


if __name__ == "__main__":
    main()
