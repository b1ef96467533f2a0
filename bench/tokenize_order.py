"""What keeping the tokenizer's carry in stream order costs: Ray Data supply when the single tokenizer actor
gets one batch at a time (what ``files_dataset`` does, so that a batch's leftover tokens carry into the next
batch in order) against Ray's default (several batches queued per actor, which it may run out of order),
and a pool of two actors that packs each batch on its own.

    python bench/tokenize_order.py [--reps 5] [--rows 12000]

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
    "one actor, one batch in flight (carry in order, shipped)": {"actors": 1, "ray_default": False},
    "one actor, Ray's default (queued batches may run out of order)": {"actors": 1, "ray_default": True},
    "two actors (each batch packed alone, shipped)": {"actors": 2, "ray_default": False},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=12000)
    args = ap.parse_args()

    import ray
    import ray.data

    from ray_lifelong.config import load_config
    from ray_lifelong.data.stream import quiet_ray_data
    from ray_lifelong.pipeline import prepare_demo, prepare_tokenizer

    shipped = ray.data.ActorPoolStrategy

    def ray_default(*a, **kw):  # the strategy as Ray Data builds it when nothing is said about tasks in flight
        kw.pop("max_tasks_in_flight_per_actor", None)
        return shipped(*a, **kw)

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
            ray.data.ActorPoolStrategy = ray_default if v["ray_default"] else shipped
            try:
                rates[name].append(data_supply(cfg, tok_dir, min_rows=args.rows)["tokens_per_s"])
            finally:
                ray.data.ActorPoolStrategy = shipped
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
