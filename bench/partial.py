"""One benchmark's partial results, shared by several invocations that run its methods side by side (kept
apart from the benchmarks' torch-importing helpers: a process that merges a result imports nothing more)."""

from __future__ import annotations

import json
from pathlib import Path


def save_partial(partial: Path, method: str, result: dict) -> dict:
    """Add one finished method to partial-<arch>.json, merged under a lock so that several invocations on
    one --out (one per method, on a machine with room for them side by side) keep each other's results."""
    import fcntl

    with open(partial.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = json.loads(partial.read_text()) if partial.exists() else {}
        merged[method] = result
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=1))
        tmp.replace(partial)
    return merged
