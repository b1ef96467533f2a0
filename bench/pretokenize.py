"""What ``data.pretokenize`` saves: a domain tokenized and packed once, against the text stream that
tokenizes it again on every read.

Two parts, each with its baseline in the same run (ratios: the machine is shared and noisy):

1. **Stream**: one real corpus domain read the way a training worker reads it (``iter_torch_batches``,
   a batch of 64 x 128), two full epochs, from the text files (read -> tokenizer actors -> pack) and from
   the packed Parquet rows; the one-off packing cost; time to the first batch of each epoch.
2. **Pipeline**: the same short runs on three corpus domains, text stream against pretokenized: ELLE
   (growth, FRW, memory, replay, prompts) and joint (each stage re-trains on every domain so far, fully
   shuffled): wall time in total, in the stages, and outside them (packing, memory sampling, validation),
   the workers' data wait, and the final AP (the packed rows are the streamed rows).

    python bench/pretokenize.py [--arch gpt2] [--steps 30] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CORPUS, REPO, write


def stream_part(cfg, tok_dir: str, work: Path, domain: str) -> dict:
    from ray_lifelong.data.packed import pack_domain, packed_dataset
    from ray_lifelong.data.stream import StreamOptions, files_dataset

    opts = StreamOptions(tok_dir, cfg.model.arch, cfg.data)
    i, dom = next((i, d) for i, d in enumerate(cfg.data.domains) if d.name == domain)

    def epochs(make, n=2) -> list[dict]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            first, rows = None, 0
            for b in make().iter_torch_batches(batch_size=64):
                first = first or time.perf_counter() - t0
                rows += len(b["input_ids"])
            out.append({"first_batch_s": round(first, 2), "epoch_s": round(time.perf_counter() - t0, 2),
                        "rows": rows})
        return out

    text = epochs(lambda: files_dataset([(i, dom)], "train", opts, prompts=True))
    root = work / "packed"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    rec = pack_domain(i, dom, opts, str(root), prompts=True)
    pack_s = time.perf_counter() - t0
    packed = epochs(lambda: packed_dataset([rec]))
    assert packed[0]["rows"] == text[0]["rows"] == rec["rows"], (packed, text, rec["rows"])
    return {"domain": domain, "rows": rec["rows"], "tokens": rec["tokens"], "pack_once_s": round(pack_s, 2),
            "text": text, "packed": packed,
            "epoch_speedup": round(sum(e["epoch_s"] for e in text) / sum(e["epoch_s"] for e in packed), 2),
            "text_tokens_per_s": round(rec["tokens"] / (sum(e["epoch_s"] for e in text) / len(text))),
            "packed_tokens_per_s": round(rec["tokens"] / (sum(e["epoch_s"] for e in packed) / len(packed)))}


def pipeline_part(arch: str, work: Path, steps: int, tok_dir: str, domains: list[str], method: str) -> dict:
    from ray_lifelong.pipeline import run_lifelong

    out = {}
    for mode in ("text", "pretokenized"):
        cfg = bench_config(arch, work, domains, [
            str(REPO / f"configs/methods/{method}.yaml"),
            f"run_name={method}-{mode}", f"tokenizer.path={tok_dir}", f"train.steps={steps}",
            *(["continual.frw.steps=10", "continual.frw.warmup_steps=2"] if method != "joint" else []),
            f"data.pretokenize={mode == 'pretokenized'}",
            f"train.log_every={max(1, steps // 3)}", f"train.checkpoint_every={steps}"])
        shutil.rmtree(work / f"{method}-{mode}", ignore_errors=True)
        t0 = time.perf_counter()
        res = run_lifelong(cfg)
        wall = time.perf_counter() - t0
        parts = [s for st in res["stages"] for s in [st, st.get("frw")] if s]
        in_stages = sum(p["wall_time_s"] for p in parts)
        out[mode] = {"wall_s": round(wall, 1), "in_stages_s": round(in_stages, 1),
                     "outside_stages_s": round(wall - in_stages, 1),
                     "data_wait_s": round(sum(p["data_wait_s"] for p in parts), 1),
                     "ray_train_runs": len(res["stages"]), "final_AP": round(res["AP"][-1], 2),
                     "steps": sum(p["steps"] for p in parts)}
    out["wall_ratio"] = round(out["text"]["wall_s"] / out["pretokenized"]["wall_s"], 2)
    return out


def bench_config(arch: str, work: Path, domains: list[str], extra: list[str]):
    """The CPU ELLE stream config (its growth schedule) cut to ``domains``, reading the corpus at CORPUS."""
    from ray_lifelong.config import load_config

    cfg = load_config(REPO / f"configs/elle_stream_{arch}.yaml", [f"output_dir={work}", *extra])
    cfg.data.domains = [d for name in domains for d in cfg.data.domains if d.name == name]
    for d in cfg.data.domains:
        d.train, d.valid = (
            [str(CORPUS / d.name / "train.jsonl.gz")],
            [str(CORPUS / d.name / "valid.jsonl.gz")],
        )
    cfg.data.domains[0].grow = None
    return cfg


def table(r: dict) -> str:
    s = r["stream"]
    lines = [
        (
            f"# data.pretokenize on the CPU ({r['arch']}, vocab {r['vocab_size']}, seq {r['seq_len']}; "
            f"{r['ray_cpus']} Ray CPUs on {r['machine_cpus']} cores)"
        ),
        "",
        (
            f"## Stream: domain `{s['domain']}` ({s['rows']} sequences, {s['tokens'] / 1e6:.2f} M tokens), "
            "read like a worker (batches of 64), two epochs"
        ),
        "",
        "| source | epoch 1 (s) | epoch 2 (s) | first batch, epoch 1 / 2 (s) | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name, key in (("text files (tokenizer actors)", "text"), ("packed Parquet", "packed")):
        e = s[key]
        lines.append(
            f"| {name} | {e[0]['epoch_s']} | {e[1]['epoch_s']} | {e[0]['first_batch_s']} / "
            f"{e[1]['first_batch_s']} | {s[key + '_tokens_per_s']:,} |"
        )
    lines += [
        "",
        (
            f"Packing once took {s['pack_once_s']} s; each later epoch is **{s['epoch_speedup']}x** "
            "faster to read."
        ),
        "",
    ]
    lines += [
        f"## Pipeline: {' -> '.join(r['domains'])}, {r['steps']} steps per stage",
        "",
        (
            "ELLE: growth before each new domain, FRW 10 steps (inside the grown stage's Ray Train run), "
            "memory sampled after each stage, replay. "
            "Joint: every stage trains on all domains so far, fully shuffled (so the text stream tokenizes "
            "all "
            "of them before its first batch). The pretokenized runs' wall time includes packing each domain "
            "once."
        ),
        "",
        (
            "| method | stream | wall (s) | in stages (s) | outside stages (s) | data wait (s) | Ray Train "
            "runs "
            "| final AP |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, p in r["pipeline"].items():
        for mode in ("text", "pretokenized"):
            m = p[mode]
            lines.append(
                f"| {method} | {mode} | {m['wall_s']} | {m['in_stages_s']} | {m['outside_stages_s']} "
                f"| {m['data_wait_s']} | {m['ray_train_runs']} | {m['final_AP']} |"
            )
        lines.append(f"| {method} | ratio text / pretokenized | **{p['wall_ratio']}x** | | | | | |")
    lines += [
        "",
        (
            "Reading: packing costs about one read of the domain's text, so it pays back only where a domain "
            "is read more than once: later epochs, a joint run's later stages (less data wait above), "
            "the trials of a sweep or the methods of a benchmark sharing one `packed_path`. A run that "
            "reads each domain once, for a fraction of an epoch (these 30-step stages read under 4% of "
            "each domain), gains nothing in wall time. Packed domains are read with Ray Data's V1 Parquet "
            "reader (`parquet_read.md`: the default V2 waited about 4 s before every read's first rows)."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "bert"])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per stage in the pipeline part")
    ap.add_argument("--domains", nargs="+", default=["wb", "news", "reviews"])
    ap.add_argument("--methods", nargs="+", default=["elle", "joint"], help="configs/methods/<m>.yaml")
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-pretokenize"))
    args = ap.parse_args()
    import os

    import ray

    from ray_lifelong.data.run_tokenizer import prepare_tokenizer
    from ray_lifelong.data.stream import quiet_ray_data

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(args.arch, args.work, args.domains, [])
    tok_dir = prepare_tokenizer(cfg, args.work / f"tokenizer-{args.arch}")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    result = {
        "arch": args.arch,
        "vocab_size": cfg.tokenizer.vocab_size,
        "seq_len": cfg.data.seq_len,
        "ray_cpus": args.num_cpus,
        "machine_cpus": os.cpu_count(),
        "domains": args.domains,
        "steps": args.steps,
        "tokenize_actors": cfg.data.tokenize_actors,
    }
    result["stream"] = stream_part(cfg, tok_dir, args.work, args.domains[0])
    print(result["stream"])
    result["pipeline"] = {
        m: pipeline_part(args.arch, args.work, args.steps, tok_dir, args.domains, m) for m in args.methods
    }
    write("pretokenize", result, table(result))


if __name__ == "__main__":
    main()
