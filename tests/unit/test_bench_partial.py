"""bench/elle_stream.py keeps every method's result when several invocations share one work directory."""

import json
import multiprocessing as mp

from bench.partial import save_partial


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
        p.join(300)
        assert p.exitcode == 0
    merged = json.loads(partial.read_text())
    assert set(merged) == {"elle", *methods}
    assert merged["m3"] == {"AP": [2.0]}
    # a method trained again replaces its entry and keeps the others
    assert save_partial(partial, "elle", {"AP": [0.5]})["elle"] == {"AP": [0.5]} and len(merged) == 9


def test_goals_are_undecided_without_the_methods_they_compare_with():
    from bench.elle_stream import goals

    def m(ap, ap_plus, flops):
        return {"AP": [ap], "AP_plus": [ap_plus], "flops": [flops]}

    assert goals({"elle": m(250, -100, 30)}) == {
        "elle_lowest_final_AP": None,
        "elle_AP_plus_below_naive_and_er": None,
    }
    assert (
        goals({"elle": m(250, -100, 30), "naive": m(270, 130, 30)})["elle_AP_plus_below_naive_and_er"] is None
    )
    full = goals(
        {
            "elle": m(250, -100, 30),
            "naive": m(270, 130, 30),
            "er": m(140, -130, 30),
            "joint": m(90, -200, 30),
            "scratch_large": m(240, -40, 45),
            "logit_kd": m(150, -120, 33),
            "elle_no_growth": m(160, -110, 30),
        }
    )
    assert full["elle_lowest_final_AP"] is False  # er is lower; joint does not count
    assert full["elle_AP_plus_below_naive_and_er"] is False  # er forgets less
    assert full["elle_reaches_scratch_large_AP_within_60pct_flops"] is False
    assert (
        goals(
            {
                "elle": m(100, -300, 20),
                "naive": m(270, 130, 30),
                "er": m(140, -130, 30),
                "scratch_large": m(240, -40, 45),
            }
        )["elle_reaches_scratch_large_AP_within_60pct_flops"]
        is True
    )
