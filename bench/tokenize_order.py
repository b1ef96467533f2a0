"""What keeping the tokenizer's carry in stream order costs: Ray Data supply when the single tokenizer actor
gets one batch at a time (what ``files_dataset`` does, so that a batch's leftover tokens carry into the next
batch in order) against Ray's default (several batches queued per actor, which it may run out of order),
and a pool of two actors that packs each batch on its own.

    python bench/tokenize_order.py [--reps 5] [--rows 12000] [--write-reps 3]

Then packs the whole domain once per writer (``--write-reps``): Ray Data's parallel ``write_parquet``
(which may interleave a write task's blocks) against ``write_in_order`` (the driver writes in stream order).

Writes ``bench/results/tokenize_order.{json,md}``. The variants alternate within each repetition, in one
Ray session, so the machine's noise hits them alike; the ratio is against the default in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, base_overrides, data_supply, workloads, write

VARIANTS = {
    "one actor, one batch in flight (carry in order, shipped)": {"actors": 1, "ray_default": False},
    "one actor, Ray's default (queued batches may run out of order)": {"actors": 1, "ray_default": True},
    "two actors (each batch packed alone, shipped)": {"actors": 2, "ray_default": False},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument(
        "--write-reps", type=int, default=3, help="repetitions of packing the whole domain (0: none)"
    )
    args = ap.parse_args()

    import ray
    import ray.data

    from ray_lifelong.config import load_config
    from ray_lifelong.data.demo import prepare_demo
    from ray_lifelong.data.markers import write_in_order
    from ray_lifelong.data.run_tokenizer import prepare_tokenizer
    from ray_lifelong.data.stream import StreamOptions, files_dataset, quiet_ray_data

    shipped = ray.data.ActorPoolStrategy

    def ray_default(
        *a, **kw
    ):  # the strategy as Ray Data builds it when nothing is said about tasks in flight
        kw.pop("max_tasks_in_flight_per_actor", None)
        return shipped(*a, **kw)

    out = Path(tempfile.mkdtemp(prefix="tokorder"))
    w = workloads(out)[-1]  # the real domain when ../shared is there, else the demo
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    quiet_ray_data()

    def config(actors: int):
        return load_config(
            REPO / "configs/demo.yaml",
            base_overrides(out, 10, 2) + w.overrides + [f"data.tokenize_actors={actors}"],
        )

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
    # packing the whole domain (data.pretokenize): Ray's parallel write_parquet (order not kept) against
    # the driver writing in stream order, both from the shipped one-actor stream
    writes: dict[str, list[float]] = {
        "write_parquet (Ray, parallel)": [],
        "write_in_order (driver, shipped)": [],
    }
    for rep in range(args.write_reps):
        for name, times in writes.items():
            dest = str(out / f"w{rep}-{len(times)}-{name[:5]}")
            ds = files_dataset(
                [(0, config(1).data.domains[0])], "train", StreamOptions(tok_dir, "bert", config(1).data)
            )
            t0 = time.perf_counter()
            if name.startswith("write_parquet"):
                ds.write_parquet(dest)
            else:
                write_in_order(ds, dest)
            times.append(time.perf_counter() - t0)
            print(f"[pack {rep}] {name}: {times[-1]:.1f} s", flush=True)
    ray.shutdown()
    ref = statistics.median(rates[list(VARIANTS)[1]])
    rows = [
        {
            "variant": name,
            "median_tokens_per_s": statistics.median(r),
            "runs": r,
            "vs_ray_default": statistics.median(r) / ref,
        }
        for name, r in rates.items()
    ]
    table = (
        "# Tokenizer actors: stream order vs Ray's default\n\n"
        f"Workload: {w.name}; supply of the read -> tokenize -> pack pipeline alone ({args.rows:,} rows, "
        f"start-up included, as in `data_throughput.md`), {args.reps} repetitions alternating the variants "
        "in one Ray session on this machine.\n\n"
        "| variant | median tokens/s | runs (k tokens/s) | vs Ray's default |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {r['variant']} | {r['median_tokens_per_s']:,.0f} | "
            f"{', '.join(f'{x / 1e3:.0f}' for x in r['runs'])} | {r['vs_ray_default']:.2f} |"
            for r in rows
        )
        + "\n"
    )
    packs = [{"writer": name, "median_s": statistics.median(t), "runs_s": t} for name, t in writes.items()]
    if args.write_reps:
        table += (
            "\nPacking the whole domain once (`data.pretokenize`), the shipped one-actor stream into "
            "Parquet, "
            f"{args.write_reps} alternating repetitions:\n\n| writer | median s | runs s |\n|---|---|---|\n"
            + "\n".join(
                f"| {p['writer']} | {p['median_s']:.1f} | {', '.join(f'{x:.1f}' for x in p['runs_s'])} |"
                for p in packs
            )
            + "\n"
        )
    write(
        "tokenize_order", {"workload": w.name, "rows": args.rows, "variants": rows, "packing": packs}, table
    )
    print(table)


if __name__ == "__main__":
    main()
