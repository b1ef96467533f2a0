"""bench/elle_stream.py keeps every method's result when several invocations share one work directory."""

import json
import multiprocessing as mp

from bench.elle_stream import save_partial


def _save(path, method):
    save_partial(path, method, {"AP": [float(len(method))]})


def test_parallel_invocations_keep_each_others_results(tmp_path):
    partial = tmp_path / "partial-gpt2.json"
    save_partial(partial, "elle", {"AP": [1.0]})
    methods = [f"m{i}" for i in range(8)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_save, args=(partial, m)) for m in methods]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    merged = json.loads(partial.read_text())
    assert set(merged) == {"elle", *methods}
    assert merged["m3"] == {"AP": [2.0]}
    # a method trained again replaces its entry and keeps the others
    assert save_partial(partial, "elle", {"AP": [0.5]})["elle"] == {"AP": [0.5]} and len(merged) == 9
