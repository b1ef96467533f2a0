"""Where the CPU of one Ray Train run goes: a tiny one-stage run (4 steps, 2 workers) started again and
again in one Ray instance, the CPU-seconds of every process it used, by kind, read from ``/proc`` while it
runs.

On a 2-core machine a run's start is CPU-bound: what a stage's fixed cost (``run_overhead.md``) and the test
suite's Ray tests spend is mostly new processes importing their modules, so this is the floor that
reordering the work cannot remove. Linux only (``/proc``).

    python bench/fit_anatomy.py [--fits 5] [--workers 2] [--name fit_anatomy]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
KINDS = (  # (kind, pattern of the process's command line), first match wins
    ("train worker", r"^ray::RayTrainWorker"),
    ("train controller", r"^ray::TrainController"),
    ("Ray Data (coordinator, dataset manager, tokenizer actor, stats)",
     r"^ray::(SplitCoordinator|DatasetManager|MapWorker|_StatsActor|_AutoscalingCoordinatorActor)"),
    ("other Ray Train actors (sync, placement-group cleaner)",
     r"^ray::(SynchronizationActor|PlacementGroupCleaner)"),
    ("pooled task workers (reading files, collecting rows)", r"^ray::(IDLE|_read_files|_all_rows|_call)"),
    ("other actors of the run (bad-record log)", r"^ray::"),
    ("Ray daemons (raylet, GCS, agents, monitors)",
     r"(raylet|gcs_server|dashboard|log_monitor|monitor\.py|runtime_env)"),
)


def _cpu_s(pid: str) -> tuple[float, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline") as f:
            cmd = f.read().replace("\0", " ").strip()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK, cmd


class CpuMeter:
    """CPU-seconds per process between :meth:`start` and :meth:`stop`, polled from ``/proc`` (a process
    born in between counts from zero; one that lives less than a poll is missed)."""

    def __init__(self, every_s: float = 0.25):
        self.every_s, self.base, self.last = every_s, {}, {}
        self._stop = threading.Event()

    def _poll(self, first: bool) -> None:
        for pid in os.listdir("/proc"):
            if pid.isdigit() and (got := _cpu_s(pid)) is not None:
                cpu, cmd = got
                self.base.setdefault(pid, cpu if first else 0.0)
                # an exiting process reads with an empty command line: keep the name it had
                self.last[pid] = (cpu - self.base[pid], cmd or self.last.get(pid, (0.0, ""))[1])

    def start(self) -> None:
        self._poll(first=True)

        def run():
            while not self._stop.wait(self.every_s):
                self._poll(first=False)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._poll(first=False)
        me = str(os.getpid())
        by_kind: dict[str, float] = defaultdict(float)
        for pid, (cpu, cmd) in self.last.items():
            if pid == me:
                by_kind["driver (this process)"] += cpu
                continue
            kind = next((k for k, pat in KINDS if re.search(pat, cmd)), None)
            if kind is not None:
                by_kind[kind] += cpu
        return dict(by_kind)


def import_cpu_s(modules: str) -> float:
    """CPU-seconds of a fresh Python process that imports ``modules`` (a worker's share of its start)."""
    t = os.times()
    subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)
    u = os.times()
    return round(u.children_user - t.children_user + u.children_system - t.children_system, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fits", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--name", default="fit_anatomy")
    args = ap.parse_args()

    import ray

    from ray_lifelong.config import load_config
    from ray_lifelong.data.demo import write_demo_corpus
    from ray_lifelong.data.run_tokenizer import prepare_tokenizer
    from ray_lifelong.data.stream import BadRecordLog, StreamOptions, quiet_ray_data, validation_rows
    from ray_lifelong.stage.run import run_stage
    from ray_lifelong.stage.spec import StageSpec, read_tokenizer_files

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as the command line sets it
    work = Path(tempfile.mkdtemp(prefix="fit_anatomy-"))
    write_demo_corpus(work / "demo", ["sports", "astronomy"], train_docs=160, valid_docs=20, shards=2)
    demo = work / "demo"
    doms = ", ".join(
        f"{{name: {d}, train: ['{demo}/{d}/train-*.jsonl.gz'], valid: ['{demo}/{d}/valid-*.jsonl.gz']}}"
        for d in ("sports", "astronomy"))
    cfg = load_config(None, [
        f"output_dir={work}/out", f"data.domains=[{doms}]", "data.seq_len=32", "data.eval_max_sequences=16",
        "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_position_embeddings=64", "tokenizer.vocab_size=600", "train.steps=4",
        "train.batch_size=8", "train.micro_batch_size=4", "train.log_every=2",
        f"scaling.num_workers={args.workers}", "scaling.cpus_per_worker=0.5",
    ])
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    quiet_ray_data()
    tok = prepare_tokenizer(cfg, work / "tok")
    valid = validation_rows(cfg.data.domains, StreamOptions(tok, cfg.model.arch, cfg.data), None)
    fits = []
    for k in range(args.fits):
        spec = StageSpec(cfg=cfg, index=0, domain="sports", eval_domains=["sports", "astronomy"], steps=4,
                         batch_size=8, lr=cfg.train.lr, tokenizer_files=read_tokenizer_files(tok))
        log = BadRecordLog.remote()
        meter = CpuMeter()
        meter.start()
        t0 = time.perf_counter()
        res = run_stage(spec, tokenizer_dir=tok, storage_path=str(work / f"ckpt{k}"), valid=valid,
                        bad_log=log)
        wall = time.perf_counter() - t0
        cpu = meter.stop()
        fits.append({"wall_s": round(wall, 2), "cpu_s": {k2: round(v, 2) for k2, v in cpu.items()},
                     "timings": {k2: round(v, 2) for k2, v in res.timings.items() if v is not None},
                     "compute_s": round(res.timings.get("compute_s") or 0.0, 2)})
        print(f"fit {k}: wall {wall:.1f} s, CPU {sum(cpu.values()):.1f} s", flush=True)
    ray.shutdown()
    imports = {
        "train worker's modules (torch, Ray Train, transformers' BERT, the stage loop)":
            import_cpu_s("ray.train.torch, transformers.models.bert.modeling_bert, ray_lifelong.stage.loop"),
        "a Ray Data actor's (Ray Data, the stream module)":
            import_cpu_s("ray.data, ray_lifelong.data.stream"),
        "import ray": import_cpu_s("ray"),
    }
    later = fits[1:] or fits  # the first fit also starts the instance's pooled workers
    kinds = sorted({k for f in later for k in f["cpu_s"]},
                   key=lambda k: -sum(f["cpu_s"].get(k, 0) for f in later))
    # the median over the fits: a poll now and then misses a process that lives less than a poll, or
    # reads it before it has done its work, and one such fit should not move the figure
    per_kind = {k: sorted(f["cpu_s"].get(k, 0.0) for f in later) for k in kinds}
    mean = {k: round(statistics.median(v), 2) for k, v in per_kind.items()}
    total = round(sum(mean.values()), 1)
    wall = round(statistics.median(f["wall_s"] for f in later), 1)
    cores = os.cpu_count() or 1
    lines = [
        "# Where the CPU of one Ray Train run goes",
        "",
        f"{cores} CPUs; a one-stage run of 4 steps ({args.workers} workers, the tests' 1x32 BERT) started "
        f"{args.fits} "
        "times in one Ray instance; CPU-seconds per process kind read from /proc while each ran, the median "
        "and range over the runs after the first (which also starts the instance's pooled workers). A "
        "profile of one machine.",
        "",
        f"Wall time {wall} s a run (median; range {min(f['wall_s'] for f in later)}-"
        f"{max(f['wall_s'] for f in later)}), of which training compute {later[-1]['compute_s']} s; CPU "
        f"{total} s (the medians' sum), {total / max(wall, 1e-9) / cores:.0%} of the {cores} cores over the "
        "run.",
        "",
        "| process kind | CPU s a run (median) | range |",
        "|---|---|---|",
        *[f"| {k} | {v} | {per_kind[k][0]}-{per_kind[k][-1]} |" for k, v in mean.items()],
        "",
        "Imports alone, CPU-seconds of a fresh process (each new process of a run pays its own):",
        "",
        "| imports | CPU s |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in imports.items()],
    ]
    write(args.name, {"fits": fits, "median_cpu_s_later_fits": mean, "wall_s_later_fits": wall,
                      "cpu_s_later_fits": total, "imports_cpu_s": imports, "cpus": cores},
          "\n".join(lines) + "\n", meta={"config": f"4 steps, {args.workers} workers, BERT 1x32, seq_len 32"})


if __name__ == "__main__":
    main()
