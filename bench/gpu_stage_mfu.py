"""A stage's training step under Ray Train beside the same step without Ray, on one GPU: tokens/s, MFU and
their ratio (goal: Ray >= 0.95x the plain step).

    python bench/gpu_stage_mfu.py [--steps 60] [--warmup 20] [--name gpu_stage_mfu]
    python bench/gpu_stage_mfu.py --smoke      # a tiny model on the CPU: checks the script runs

Ray: one stage of ``ray-lifelong``'s own loop (1 worker, the whole GPU, bf16) on a GPT-2-small-sized model
(12 x 768, seq 1024, batch 16) over pre-tokenized demo rows (materialised first, so that the figure is
Ray Train's and not the tokenizer's); steady-state rate from its step log after ``--warmup`` steps.
Plain: ``bench/gpu_throughput.py``'s step (the stage's objective, optimizer, masking and bf16 autocast)
on a model of the same sizes and vocabulary. One timing each, back to back on the same card.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bench.gpu_throughput as gt  # noqa: E402
from bench.common import ray_stage, write  # noqa: E402
from ray_lifelong.config import load_config  # noqa: E402
from ray_lifelong.data.demo import prepare_demo  # noqa: E402
from ray_lifelong.data.run_tokenizer import prepare_tokenizer  # noqa: E402
from ray_lifelong.data.tokenizer import load_tokenizer  # noqa: E402
from ray_lifelong.models.build import padded_vocab  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--name", default="gpu_stage_mfu")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    sizes = (12, 768, 12, 3072, 1024, 16) if not args.smoke else (2, 64, 2, 128, 64, 4)
    layers, hidden, heads, ffn, seq, batch = sizes
    steps, warmup = (args.steps, args.warmup) if not args.smoke else (8, 2)
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as out:
        demo = Path(out) / "demo"
        cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
            f"output_dir={out}", f"demo.dir={demo}", "demo.domains=[sports]", "demo.train_docs=40000",
            f"data.domains=[{{name: sports, train: ['{demo}/sports/train-*.jsonl.gz'], "
            f"valid: ['{demo}/sports/valid-*.jsonl.gz']}}]",
            "model.arch=gpt2", f"model.num_layers={layers}", f"model.hidden_size={hidden}",
            f"model.num_heads={heads}", f"model.intermediate_size={ffn}",
            f"model.max_position_embeddings={seq}",
            f"data.seq_len={seq}", "data.eval_max_sequences=4", "tokenizer.vocab_size=8000",
            f"train.steps={steps}", f"train.batch_size={batch}", f"train.micro_batch_size={batch}",
            f"train.log_every={1 if args.smoke else 5}", f"train.checkpoint_every={steps + 1}",
            "train.bf16=true",
            "scaling.num_workers=1", "scaling.cpus_per_worker=2", f"scaling.use_gpu={str(gpu).lower()}",
        ])
        prepare_demo(cfg)
        tok_dir = prepare_tokenizer(cfg, Path(out) / "tokenizer")
        vocab = padded_vocab(len(load_tokenizer(tok_dir)), cfg.model.vocab_multiple)
        on_ray = ray_stage(cfg, tok_dir, warmup, materialize=True)
    ray.shutdown()
    gt.MODELS["stage"] = ("gpt2", layers, hidden, heads, ffn, vocab, seq, batch)
    device = torch.device("cuda" if gpu else "cpu")
    plain = gt.time_variant("stage", "bf16" if gpu else "fp32", steps=steps - warmup, warmup=warmup,
                            device=device)
    train_f, _ = gt.model_flops("gpt2", layers, hidden, ffn, vocab, seq)
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = gt.peak_tflops(name) if gpu else None

    def mfu(tokens_per_s: float) -> float | None:
        return tokens_per_s / seq * train_f / (peak * 1e12) if peak else None

    ratio = on_ray["tokens_per_s"] / plain["tokens_per_s"]
    payload = {"device": name, "model": gt.MODELS["stage"], "ray": on_ray, "plain": plain,
               "ray_mfu": mfu(on_ray["tokens_per_s"]), "plain_mfu": mfu(plain["tokens_per_s"]),
               "ray_vs_plain": ratio, "goal_met": ratio >= 0.95 if gpu else None}
    verdict = ("**met**" if ratio >= 0.95 else "**missed**") if gpu else "**undecided** (no GPU: smoke run)"
    ray_mfu, plain_mfu = payload["ray_mfu"] or float("nan"), payload["plain_mfu"] or float("nan")
    table = (f"# A stage's step under Ray vs. the plain step ({name})\n\n"
             f"| side | tokens/s | MFU |\n|---|---|---|\n"
             f"| Ray Train stage | {on_ray['tokens_per_s']:,.0f} | {ray_mfu:.3f} |\n"
             f"| plain step | {plain['tokens_per_s']:,.0f} | {plain_mfu:.3f} |\n\n"
             f"Goal Ray >= 0.95x plain: {verdict} ({ratio:.3f}x; one timing each, no spread).")
    write(args.name, payload, table)


if __name__ == "__main__":
    main()
