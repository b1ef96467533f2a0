"""What keeping the tokenizer's carry in stream order costs: Ray Data supply when the single tokenizer actor
runs its queued tasks in submission order (what ``files_dataset`` does, so that a batch's leftover tokens
carry into the next batch in order), against Ray's default (an actor may run queued tasks out of order),
against one batch in flight per actor (the other way to keep the order), and a pool of two actors that
packs each batch on its own.

    python bench/tokenize_order.py [--reps 3] [--rows 12000]

Writes ``bench/results/tokenize_order.{json,md}``. The variants alternate within each repetition, in one
Ray session, so the machine's noise hits them alike; the ratio is against the default in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, base_overrides, data_supply, workloads, write  # noqa: E402

VARIANTS = {
    "one actor, tasks run in order (carry, shipped)": {"actors": 1, "mode": "shipped"},
    "one actor, Ray's default (out of order allowed)": {"actors": 1, "mode": "ray_default"},
    "one actor, one batch in flight": {"actors": 1, "mode": "one_in_flight"},
    "two actors (each batch packed alone, shipped)": {"actors": 2, "mode": "shipped"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=12000)
    args = ap.parse_args()

    import ray
    import ray.data

    from ray_lifelong.config import load_config
    from ray_lifelong.data.stream import quiet_ray_data
    from ray_lifelong.pipeline import prepare_demo, prepare_tokenizer

    import ray_lifelong.data.stream as stream

    shipped_strategy, shipped_order = ray.data.ActorPoolStrategy, stream._in_order

    def one_in_flight(*a, **kw):
        return shipped_strategy(*a, **{**kw, "max_tasks_in_flight_per_actor": 1})

    def patch(mode: str) -> None:  # the variants differ only in how files_dataset builds the tokenizer stage
        ray.data.ActorPoolStrategy = one_in_flight if mode == "one_in_flight" else shipped_strategy
        stream._in_order = (lambda: {}) if mode != "shipped" else shipped_order

    out = Path(tempfile.mkdtemp(prefix="tokorder"))
    w = workloads(out)[-1]  # the real domain when ../shared is there, else the demo
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    quiet_ray_data()

    def config(actors: int):
        return load_config(REPO / "configs/demo.yaml", base_overrides(out, 10, 2) + w.overrides
                           + [f"data.tokenize_actors={actors}"])

    prepare_demo(config(1))
    tok_dir = prepare_tokenizer(config(1), out / "tok")
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        for name, v in VARIANTS.items():
            cfg = config(v["actors"])
            patch(v["mode"])
            try:
                rates[name].append(data_supply(cfg, tok_dir, min_rows=args.rows)["tokens_per_s"])
            finally:
                patch("shipped")
            print(f"[rep {rep}] {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    ray.shutdown()
    ref = statistics.median(rates[list(VARIANTS)[1]])
    rows = [{"variant": name, "median_tokens_per_s": statistics.median(r), "runs": r,
             "vs_ray_default": statistics.median(r) / ref} for name, r in rates.items()]
    table = ("# Tokenizer actors: stream order vs Ray's default\n\n"
             f"Workload: {w.name}; supply of the read -> tokenize -> pack pipeline alone ({args.rows:,} rows, "
             f"start-up included, as in `data_throughput.md`), {args.reps} repetitions alternating the variants "
             "in one Ray session on this machine.\n\n"
             "| variant | median tokens/s | runs (k tokens/s) | vs Ray's default |\n|---|---|---|---|\n"
             + "\n".join(f"| {r['variant']} | {r['median_tokens_per_s']:,.0f} | "
                         f"{', '.join(f'{x / 1e3:.0f}' for x in r['runs'])} | {r['vs_ray_default']:.2f} |"
                         for r in rows) + "\n")
    write("tokenize_order", {"workload": w.name, "rows": args.rows, "variants": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
