"""How long Ray Data takes to yield the first rows of a packed domain: Ray 2.60's default V2 Parquet
datasource against V1, both in one Ray instance, alternating, on the same packed domain (the demo's
``sports`` at the tests' sizes). Two ways to read: ``iter_batches`` on the driver (a memory sample) and
``streaming_split`` as a Ray Train worker reads its shard (a stage's stream). The rows are compared too.

    python bench/parquet_read.py [--repeats 6] [--name parquet_read]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write  # noqa: E402


def first_rows_s(uri: str, v2: bool, split: bool) -> tuple[float, np.ndarray]:
    """Seconds from planning the read to its first batch, and all its rows (read after the timing)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = v2
    t = time.perf_counter()
    ds = ray.data.read_parquet(uri, file_extensions=["parquet"])
    source = ds.streaming_split(1)[0] if split else ds
    batches = iter(source.iter_batches(batch_size=8, batch_format="numpy"))
    first = next(batches)
    took = time.perf_counter() - t
    rows = np.concatenate([first["input_ids"], *(b["input_ids"] for b in batches)])
    return took, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--name", default="parquet_read")
    args = ap.parse_args()

    import ray

    from ray_lifelong.config import load_config
    from ray_lifelong.data.demo import write_demo_corpus
    from ray_lifelong.data.packed import pack_domain
    from ray_lifelong.data.run_tokenizer import prepare_tokenizer
    from ray_lifelong.data.stream import StreamOptions, quiet_ray_data

    work = Path(tempfile.mkdtemp(prefix="parquet_read-"))
    demo = work / "demo"
    write_demo_corpus(demo, ["sports"], train_docs=160, valid_docs=20, shards=2)
    cfg = load_config(None, [
        f"output_dir={work}/out", "data.pretokenize=true", "data.seq_len=32", "tokenizer.vocab_size=600",
        f"data.domains=[{{name: sports, train: ['{demo}/sports/train-*.jsonl.gz'], "
        f"valid: ['{demo}/sports/valid-*.jsonl.gz']}}]",
    ])
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    quiet_ray_data()
    opts = StreamOptions(prepare_tokenizer(cfg, work / "tok"), cfg.model.arch, cfg.data)
    rec = pack_domain(0, cfg.data.domains[0], opts, str(work / "packed"), prompts=False)

    times: dict[str, list[float]] = {}
    rows: dict[str, np.ndarray] = {}
    first_rows_s(rec["uri"], True, False)  # the instance's pooled workers import Ray Data once
    for _ in range(args.repeats):
        for split in (False, True):
            for v2 in (True, False):
                key = f"{'V2' if v2 else 'V1'} {'streaming_split' if split else 'iter_batches'}"
                took, got = first_rows_s(rec["uri"], v2, split)
                times.setdefault(key, []).append(round(took, 3))
                rows.setdefault(key, got)
    ray.shutdown()
    same = all(np.array_equal(r, rows["V2 iter_batches"]) for r in rows.values())
    result = {
        "rows": int(rec["rows"]),
        "same_rows_in_the_same_order": same,
        "first_rows_s": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
                         for k, v in times.items()},
    }
    lines = [
        "# Time to the first rows of a packed domain: Ray Data's V2 Parquet datasource vs V1",
        "",
        f"2 CPUs, one Ray instance; a packed demo domain of {rec['rows']} rows (one Parquet file); each way "
        f"read {args.repeats} times, V2 and V1 alternating, after one warm-up read. Seconds from "
        "`read_parquet` to the first batch. The same rows in the same order from both: "
        f"**{'yes' if same else 'no'}**.",
        "",
        "| read | median s | min | max |",
        "|---|---|---|---|",
    ]
    for k, v in result["first_rows_s"].items():
        lines.append(f"| {k} | {v['median']:.2f} | {v['min']:.2f} | {v['max']:.2f} |")
    write(args.name, result, "\n".join(lines))


if __name__ == "__main__":
    main()
