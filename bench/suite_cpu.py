"""Where a command's CPU goes on this machine, by kind of process: every process's CPU time read from
``/proc`` every half second while the command runs (the test suite, a demo run), each process counted under
the last name it had (a Ray worker under its actor or task, ``ray::RayTrainWorker``, ...). On a 2-core
machine the test suite is CPU-bound, so this is the map of what would shorten it. Linux only.

    python bench/suite_cpu.py --name suite_cpu -- python -m pytest -q tests

A process that lives less than a poll is missed, and one that dies loses its last half second: the totals
are a lower bound (the machine's own total is written beside them for comparison).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
NAMED = (  # (kind, pattern of the command line) for the processes that are not Ray workers, first match wins
    ("Ray worker, before its actor or task", r"default_worker\.py"),
    ("raylet", r"/raylet( |$)"),
    ("GCS", r"gcs_server"),
    ("dashboard and its modules", r"dashboard/dashboard\.py|^ray-dashboard-"),
    ("dashboard agent", r"dashboard/agent\.py"),
    ("runtime-env agent", r"runtime_env/agent"),
    ("log monitor", r"log_monitor"),
    ("autoscaler monitor", r"monitor\.py"),
    ("ray-lifelong command", r"-m ray_lifelong|ray-lifelong"),
    ("ray CLI (start, job)", r"bin/ray "),
    ("pytest and its xdist workers", r"pytest|exec\(eval\(sys\.s"),
    ("C++ compiler (torch inductor)", r"cc1plus|g\+\+|/cc "),
    ("S3 server (moto)", r"moto"),
    ("multiprocessing children", r"multiprocessing"),
)


def kind_of(cmd: str) -> str:
    if cmd.startswith("ray::"):  # ray::Class.method, ray::task, ray::IDLE
        return re.split(r"[.( ]", cmd, maxsplit=1)[0]
    for kind, pattern in NAMED:
        if re.search(pattern, cmd):
            return kind
    return "other"


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


class Sampler:
    """Per process, its CPU ticks and its latest kind; processes that were there before the start count
    from their ticks at the start."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.stop = every_s, threading.Event()
        self.base: dict[int, int] = {}
        self.seen: dict[int, tuple[str, int]] = {}
        self.ended: list[tuple[str, int]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, tuple[str, int]]:
        now = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if cmd:
                now[int(d)] = (kind_of(cmd), int(fields[11]) + int(fields[12]))
        return now

    def start(self) -> None:
        self.base = {pid: ticks for pid, (_, ticks) in self._sample().items()}
        self.busy0 = _busy_ticks()
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            now = self._sample()
            for pid in set(self.seen) - set(now):
                self.ended.append(self.seen.pop(pid))
            for pid, (kind, ticks) in now.items():
                before = self.seen.get(pid)
                # a worker keeps the kind it had as an actor or task once it leaves "before its actor or task"
                if before and kind == "Ray worker, before its actor or task":
                    kind = before[0]
                self.seen[pid] = (kind, ticks - self.base.get(pid, 0))
            time.sleep(self.every_s)

    def finish(self) -> tuple[dict, float]:
        self.stop.set()
        self.thread.join()
        machine = (_busy_ticks() - self.busy0) / TICK
        cpu, count = Counter(), Counter()
        for kind, ticks in [*self.ended, *self.seen.values()]:
            if ticks > 0:
                cpu[kind] += ticks / TICK
                count[kind] += 1
        kinds = {k: {"cpu_s": round(v, 1), "processes": count[k]} for k, v in cpu.most_common()}
        return kinds, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="suite_cpu")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to measure after --")
    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    rc = subprocess.run(command).returncode
    wall = time.time() - t0
    time.sleep(2)  # the command's last processes exit
    kinds, machine = sampler.finish()
    counted = sum(v["cpu_s"] for v in kinds.values())
    rows = [f"| {k} | {v['processes']} | {v['cpu_s']} | {v['cpu_s'] / v['processes']:.2f} |"
            for k, v in kinds.items()]
    md = "\n".join([
        f"# Where the CPU of `{' '.join(command)}` goes",
        "",
        f"{os.cpu_count()} CPUs; `bench/suite_cpu.py`: every process's CPU read from /proc every 0.5 s while "
        f"the command ran, each process under the last name it had (a Ray worker under its actor or task, "
        f"its start before that counted with it). Exit status {rc}; wall time {wall:.0f} s; CPU counted "
        f"{counted:.0f} s of the machine's {machine:.0f} s busy (processes shorter than a poll are missed).",
        "",
        "| process kind | processes | CPU s | CPU s each |",
        "|---|---|---|---|",
        *rows,
    ])
    write(args.name, {"command": command, "returncode": rc, "wall_s": round(wall, 1),
                      "machine_busy_cpu_s": round(machine, 1), "counted_cpu_s": round(counted, 1),
                      "kinds": kinds}, md)
    sys.exit(rc)


if __name__ == "__main__":
    main()
