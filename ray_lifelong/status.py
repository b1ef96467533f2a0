"""``ray-lifelong status RUN_DIR``: where a run is, read from its files alone (no Ray), while it runs,
after it finished or after it died.

A stage is done once its ``stages/<label>/stage.json`` exists; the stage after the last done one is
the current one, and its latest checkpoint in its Ray Train run (which trains the stages of its group,
:func:`stage_groups`) (``state.json``: phase, step, the last logged step's
loss, learning rate and tokens/s) says how far it got. Checkpoints are read from the run's storage
(a local path or a URI, as the run wrote them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs

from ray_lifelong.config.load import load_config
from ray_lifelong.config.plan import stage_groups, stage_plans
from ray_lifelong.data.sources import filesystem, join_uri
from ray_lifelong.layout import run_layout, stage_name


def run_status(run_dir: str | Path) -> dict:
    """The run's state: ``stages`` (label, steps, done, and for done ones their perplexity on their own
    domain and wall time), ``current`` (label, phase, step, last metrics, checkpoint) or ``None``,
    ``done`` (``results.json`` written) and the final AP when done.

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``config.yaml`` (not a run directory).
    """
    root = Path(run_dir).resolve()
    if not (root / "config.yaml").exists():
        raise FileNotFoundError(f"{root}: not a run directory (no config.yaml)")
    cfg = load_config(root / "config.yaml")
    lay = run_layout(cfg, root)
    stages, current = [], None
    group_of = {i: g[0] for g in stage_groups(cfg) for i in g}
    plans = stage_plans(cfg)
    for plan in plans:
        label = plan.label
        marker = lay.stage_marker(label)
        entry = {"label": label, "steps": plan.steps, "frw_steps": plan.frw_steps, "done": marker.exists()}
        if entry["done"]:
            rec = json.loads(marker.read_text())
            entry.update(ppl=rec["ppl"].get(plan.domain), wall_s=rec.get("wall_time_s"))
        elif current is None:
            first = plans[group_of[plan.index]]
            run = join_uri(lay.storage, stage_name(cfg.run_name, first.index, first.domain))
            current = {"label": label, **_latest_checkpoint(run, plan.index)}
        stages.append(entry)
    out = {"run": str(root), "stages": stages, "current": current, "done": lay.results.exists()}
    if out["done"]:
        out["AP"] = json.loads(lay.results.read_text())["AP"][-1]
    return out


def _latest_checkpoint(run: str, index: int) -> dict:
    """The newest checkpoint of stage ``index`` in the Ray Train run ``run`` (which may train stages before
    and after it)."""
    fs, path = filesystem(run)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return {"checkpoint": None}
    dirs = sorted(i.path for i in infos if i.type == pafs.FileType.Directory
                  and i.base_name.startswith("checkpoint_"))
    for ckpt in reversed(dirs):  # Ray Train names them by time: the last complete one
        if fs.get_file_info(f"{ckpt}/state.json").type != pafs.FileType.File:
            continue
        with fs.open_input_stream(f"{ckpt}/state.json") as f:
            state = json.loads(f.read().decode())
        if state.get("stage", index) != index:
            continue
        last = (state.get("history") or [{}])[-1]
        return {"checkpoint": ckpt, "phase": state.get("phase", "main"), "step": state.get("step", 0),
                "restarts": state.get("restarts", 0),
                "last": {k: last[k] for k in ("loss", "lr", "tokens_per_s") if k in last}}
    return {"checkpoint": None}


def format_status(st: dict) -> str:
    """The status as the command prints it: one line per stage, then the current stage's progress."""
    lines = [f"run {st['run']}: " + ("done" if st["done"] else "not finished")
             + (f", final AP {st['AP']:.2f}" if st.get("AP") is not None else "")]
    for s in st["stages"]:
        plan = f"{s['steps']} steps" + (f" after a {s['frw_steps']}-step warmup" if s["frw_steps"] else "")
        if s["done"]:
            lines.append(f"  [done] {s['label']}: {plan}, PPL on its domain {s['ppl']:.2f}, "
                         f"{s['wall_s']:.0f} s")
        else:
            lines.append(f"  [    ] {s['label']}: {plan}")
    cur = st["current"]
    if cur is not None and not st["done"]:
        if cur.get("checkpoint"):
            last = cur["last"]
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
            lines.append(f"current: {cur['label']} ({cur['phase']}) at step {cur['step']} from its last "
                         f"checkpoint{', ' + metrics if metrics else ''}; restarts {cur['restarts']}")
            lines.append(f"  checkpoint: {cur['checkpoint']}")
        else:
            lines.append(f"current: {cur['label']}, no checkpoint yet (it resumes from its start)")
    return "\n".join(lines)
