"""What a command prints: the project's own lines and real errors; Ray's internal chatter only with
``--verbose``.

Ray forwards every line its worker processes print to the driver's console, prefixed with the process
(``(RayTrainWorker pid=123)``). Most of it is Ray's own bookkeeping: a warning from its C++ core for every
actor whose constructor arguments sit in the object store, "Progress bars disabled" from each Ray Data
executor, a "Reporting training result" line per rank and report, deprecation warnings raised inside Ray.
:func:`quiet_console` wraps Ray's printer of those lines in one that drops these known messages and
prints the project's own lines (``[stage ...]``, ``[run] ...``) without the process prefix; every other
line (a traceback, an error from a library) still reaches the user whole, with its prefix.
"""

from __future__ import annotations

import logging
import re

OWN = re.compile(r"^\[(stage|run|data|ray|tune|pbt|ki|finetune)[\] ]")
"""A line the project prints itself."""

NOISE = tuple(re.compile(p) for p in (
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store",
    r"^Progress bars disabled\. To enable",
    r"Reporting training result \d+: TrainingReport\(",
    r"(Ray)?DeprecationWarning: ",
    r"PYTHON worker processes have been started on node: .* maximum expected startup concurrency",
    r"^Token authentication is enabled for this Ray cluster",
    # Ray Train's placement-group cleaner polling the state API on a loaded machine; it keeps monitoring
    r"Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable",
    # Ray Data's check when a dataset starts while the trainers hold the CPUs: the run's own datasets
    # (a memory, the next stage's stream) take fractional CPUs and go on as the trainers step
    r"The Ray cluster currently does not have any available CPUs\. The Dataset job will hang unless",
    # the GCS killing an actor that had already exited (its socket closed) as a run group ends
    r"gcs_actor_scheduler\.cc:\d+: Failed to kill actor \w+, .*Socket closed",
    # a trial the scheduler stopped: Ray Train frees its workers' placement group (the [tune] line says it)
    r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group",
    # a sweep trial's Tune bookkeeping around a checkpoint (the trial's own lines say what it continues)
    r"^Checkpoint successfully created at: Checkpoint\(",
    r"^Restored on \S+ from checkpoint: Checkpoint\(",
))
"""Ray's internal messages that a run's user cannot act on."""

_DEDUP = re.compile(r"\s*(\x1b\[\d+m)?\s*\[repeated \d+x across cluster\].*$")


def keep_lines(lines: list[str]) -> tuple[list[str], list[str]]:
    """Split forwarded lines into ``(own, other)``, dropping Ray's known noise and blank lines; the indented
    source line that Python's warnings module prints after a dropped warning goes with it."""
    own, other = [], []
    dropped_warning = False
    for raw in lines:
        line = _DEDUP.sub("", raw)
        if not line.strip():  # a blank line says nothing, and Ray would print its process prefix alone
            continue
        if dropped_warning and line.startswith(" "):
            dropped_warning = False
            continue
        dropped_warning = False
        if any(p.search(line) for p in NOISE):
            dropped_warning = "Warning: " in line
            continue
        (own if OWN.match(line) else other).append(line)
    return own, other


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p.search(record.getMessage()) for p in NOISE)


def quiet_console(verbose: bool = False) -> None:
    """Before ``ray.init``: Ray's loggers in this process drop the known noise, Ray Data's per-dataset
    INFO lines stay off the console, and the lines Ray forwards from its processes (worker output, and
    the raylet's warnings pushed to the driver) pass :func:`keep_lines`; ``verbose`` leaves Ray's
    console as it is."""
    if verbose:
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    import ray  # noqa: F401  (configures Ray's handlers, which the filter joins)

    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())
    try:  # Ray's printer of forwarded lines is internal: if it moves, its console stays as it is
        from ray._private import worker as ray_worker

        printer = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        return
    if getattr(printer, "_ray_lifelong", False):
        return

    def filtered(data: dict, ignore_prefix: bool) -> None:
        own, other = keep_lines(data.get("lines") or [])
        for line in own:
            print(line, flush=True)
        if other:
            printer({**data, "lines": other}, ignore_prefix=ignore_prefix)

    filtered._ray_lifelong = True
    # looked up by name when ray.init installs its printer and each time a raylet warning arrives
    ray_worker.print_to_stdstream = filtered
