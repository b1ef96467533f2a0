"""GPU readiness and throughput: tokens/s and MFU of the stage's training step on one GPU.

    python bench/gpu_throughput.py [--steps 20] [--warmup 5] [--out bench/results]

Runs the stage's own step (``LMObjective`` + ``lm_loss`` or the KI loss, the stage's AdamW grouping, its
CPU-drawn MLM masking, bf16 autocast, gradient clipping) on BERT-base-sized (12 x 768, seq 512) and
GPT-2-small-sized (12 x 768, seq 1024) models, without Ray, so that the numbers are the step's own.
Per model it times:

- ``fp32``: no autocast (the reference);
- ``bf16``: bf16 autocast, as the stage runs on CUDA;
- ``bf16+ddp``: the same wrapped in DistributedDataParallel over an NCCL process group of one rank, the
  path Ray Train's ``prepare_model`` takes on a GPU worker (checks NCCL and DDP work, and what they cost);
- ``bf16+compile`` (optional): the bf16 step through ``torch.compile`` (the stage's ``train.compile``);
- ``bf16+foreach`` (optional): the multi-tensor AdamW the stage used before it took the fused CUDA one;
- ``bf16+gelu_new`` (optional, GPT-2): HF's default GELU written as element-wise ops, which the stage's
  models replaced by ``gelu_pytorch_tanh`` (same function, one kernel);
- ``bf16+ki`` (GPT-2): KI from a frozen half-size bf16 teacher on the same batch, the teacher's forward
  FLOPs charged.

MFU = model FLOPs per second (flops.md: 3 x forward, the attention term included; the teacher's forward
added for KI) / the GPU's dense bf16 peak (``--peak-tflops``, default from the device name). It also
checks on the GPU that a function-preserving growth (6 x 384 -> 12 x 768) keeps the logits and that the
KI loss on bf16 logits matches a float32 reference. Writes ``gpu_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets
GOAL_MFU = 0.40
PEAKS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.05, "A10G": 125.0, "L4": 121.0}

MODELS = {
    # name: (arch, layers, hidden, heads, ffn, vocab, seq_len, batch)
    "bert-base": ("bert", 12, 768, 12, 3072, 30522, 512, 32),
    "gpt2-small": ("gpt2", 12, 768, 12, 3072, 50257, 1024, 16),
}
SPECIALS = [0, 1, 2, 3, 4]  # pad/unk/cls/sep/mask ids of a synthetic vocabulary
MASK_ID = 4


def peak_tflops(name: str) -> float | None:
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None


def model_flops(arch: str, layers: int, hidden: int, ffn: int, vocab: int, seq: int) -> tuple[float, float]:
    """(train FLOPs, forward FLOPs) of one sequence, counted as everywhere else in the project."""
    from ray_lifelong.flops import forward_flops_per_sequence, logit_positions

    fwd = forward_flops_per_sequence(num_layers=layers, hidden=hidden, ffn=ffn, vocab=vocab, seq_len=seq,
                                     logit_positions=logit_positions(arch, seq, 0.15))
    return 3.0 * fwd, fwd


def build(arch: str, layers: int, hidden: int, heads: int, ffn: int, vocab: int, seq: int, seed: int = 0):
    from ray_lifelong.config import ModelConfig
    from ray_lifelong.models.build import build_model

    cfg = ModelConfig(
        arch=arch,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=max(seq, 512),
        dropout=0.0,
    )
    return build_model(cfg, vocab, pad_id=0, eos_id=3, seed=seed)


def make_batch(arch: str, vocab: int, seq: int, batch: int, gen: torch.Generator, device):
    """Random ids, masked exactly like the stage (draws on the CPU, then moved)."""
    from ray_lifelong.data.masking import mlm_mask

    ids = torch.randint(len(SPECIALS), vocab, (batch, seq), generator=gen)
    if arch == "bert":
        inputs, labels = mlm_mask(
            ids, mask_id=MASK_ID, vocab_size=vocab, special_ids=SPECIALS, prob=0.15, generator=gen
        )
        return inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    ids = ids.to(device, non_blocking=True)
    return ids, ids


def time_variant(
    name: str, variant: str, *, steps: int, warmup: int, device, batch_mult: int = 1, profile: bool = False
) -> dict:
    from ray_lifelong.config import TrainConfig
    from ray_lifelong.distill import ki_loss_parts
    from ray_lifelong.distill.teacher import teacher_logits
    from ray_lifelong.models.build import LMObjective, lm_loss
    from ray_lifelong.stage.step import build_optimizer

    arch, layers, hidden, heads, ffn, vocab, seq, batch = MODELS[name]
    batch *= batch_mult
    model = build(arch, layers, hidden, heads, ffn, vocab, seq)
    if variant == "bf16+gelu_new" and arch == "gpt2":
        from transformers.activations import ACT2FN

        for block in model.transformer.h:
            block.mlp.act = ACT2FN["gelu_new"]
    objective = LMObjective(model).to(device)
    if variant == "bf16+ddp":
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    if variant == "bf16+compile":  # warm-up steps include the compilation
        torch._dynamo.reset()  # a fresh cache per model: no guards or graphs carried over from the last one
        objective = torch.compile(objective)
    optimizer = build_optimizer(model, 1e-4, TrainConfig())
    if variant == "bf16+foreach":
        optimizer = torch.optim.AdamW(optimizer.param_groups, lr=1e-4, foreach=True)
    bf16 = variant.startswith("bf16")
    teacher, t_fwd = None, 0.0
    if variant == "bf16+ki":  # a frozen half-depth, half-width teacher in bf16, as load_teacher leaves it
        teacher = build(arch, layers // 2, hidden // 2, heads // 2, ffn // 2, vocab, seq, seed=1)
        teacher = teacher.eval().requires_grad_(False).to(device=device, dtype=torch.bfloat16)
        t_fwd = model_flops(arch, layers // 2, hidden // 2, ffn // 2, vocab, seq)[1]
    gen = torch.Generator().manual_seed(0)
    params = list(objective.parameters())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        inputs, labels = make_batch(arch, vocab, seq, batch, gen, device)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits, targets = objective(inputs, labels)
            if teacher is not None:
                t_logits = teacher_logits(
                    {-1: teacher}, inputs, labels, torch.zeros(batch, dtype=torch.long), len(targets)
                )
                loss = ki_loss_parts(logits, t_logits, targets, alpha=0.5, temperature=1.0).total
            else:
                loss = lm_loss(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    kernels = _profile(step, sync) if profile else None
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    train_f, _ = model_flops(arch, layers, hidden, ffn, vocab, seq)
    flops = batch * (train_f + t_fwd)
    return {
        "model": name,
        "variant": variant,
        "batch": batch,
        "seq_len": seq,
        "vocab": vocab,
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": seconds,
        "tokens_per_s": batch * seq / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
        "final_loss": float(loss.detach()),
        **({"top_kernels": kernels} if kernels else {}),
    }


def _profile(step, sync, steps: int = 3, top: int = 12) -> list[dict]:
    """The kernels (or CPU ops without a GPU) that take most of the device time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    attr = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)
    total = sum(getattr(e, attr, 0) for e in events) or 1
    return [
        {
            "name": e.key[:90],
            "ms_per_step": getattr(e, attr, 0) / 1e3 / steps,
            "share": getattr(e, attr, 0) / total,
            "calls_per_step": e.count / steps,
        }
        for e in events[:top]
    ]


def growth_check(device, smoke: bool = False) -> dict:
    """6 x 384 -> 12 x 768 on the GPU, float32: the grown model's logits against the small model's."""
    from ray_lifelong.growth import expand

    out = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32's 10-bit mantissa alone gives ~1e-3 logit errors
    for arch in ("bert", "gpt2"):
        n, d = (1, 32) if smoke else (6, 384)
        small = build(arch, n, d, d // 64 or 1, 4 * d, 8000, 128).to(device).eval()
        big = (
            expand(
                small,
                num_hidden_layers=2 * n,
                hidden_size=2 * d,
                intermediate_size=8 * d,
                depth_init="identity",
            )
            .to(device)
            .eval()
        )
        ids = torch.randint(len(SPECIALS), 8000, (4, 128), generator=torch.Generator().manual_seed(0)).to(
            device
        )
        with torch.no_grad():
            a, b = small(input_ids=ids).logits.float(), big(input_ids=ids).logits.float()
        out[arch] = {"max_logit_error": float((a - b).abs().max()), "logit_scale": float(a.abs().max())}
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def ki_bf16_check(device, vocab: int) -> dict:
    """The KI loss on bf16 logits (softmaxes in float32 inside) against a float32 reference."""
    from ray_lifelong.distill import ki_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(4096, vocab, generator=g).to(device) * 3
    t = torch.randn(4096, vocab, generator=g).to(device) * 3
    y = torch.randint(vocab, (4096,), generator=g).to(device)
    ref = ki_loss(s, t, y, alpha=0.5, temperature=2.0)
    low = ki_loss(s.bfloat16(), t.bfloat16(), y, alpha=0.5, temperature=2.0)
    return {"reference": float(ref), "bf16": float(low), "rel_error": float(abs(low - ref) / ref)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--variants", nargs="*", default=["fp32", "bf16", "bf16+ddp", "bf16+ki"])
    ap.add_argument(
        "--pad-vocab",
        type=int,
        default=1,
        help="round every vocabulary up to a multiple of this (tokenizer.pad_vocab_to_multiple_of)",
    )
    ap.add_argument("--batch-mult", type=int, default=1, help="multiply every model's batch")
    ap.add_argument(
        "--profile",
        nargs="*",
        default=[],
        metavar="VARIANT",
        help="also list the top kernels of these variants (torch.profiler, 3 steps)",
    )
    ap.add_argument("--name", default="gpu_throughput", help="results file stem")
    ap.add_argument("--skip-checks", action="store_true", help="time only (no growth / KI checks)")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by device name)"
    )
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models on the CPU (gloo instead of NCCL): checks the script, measures nothing",
    )
    args = ap.parse_args()
    for k, (arch, layers, hidden, heads, ffn, vocab, seq, batch) in list(MODELS.items()):
        MODELS[k] = (
            arch,
            layers,
            hidden,
            heads,
            ffn,
            -(-vocab // args.pad_vocab) * args.pad_vocab,
            seq,
            batch,
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke:
        for k, (arch, *_rest) in list(MODELS.items()):
            MODELS[k] = (arch, 2, 64, 2, 128, 500, 64, 4)
        device, gpu, peak = torch.device("cpu"), "cpu (smoke)", None
    else:
        if not torch.cuda.is_available():
            sys.exit(
                "gpu_throughput.py needs a CUDA GPU (torch.cuda.is_available() is False); --smoke runs it on "
                "the CPU with tiny models"
            )
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # what a user's fp32 run gets on Ampere and later
        gpu = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or peak_tflops(gpu)

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    probe = torch.ones(4, device=device)
    dist.all_reduce(probe)

    rows = []
    for name in args.models:
        for variant in args.variants:
            if variant in ("bf16+ki", "bf16+gelu_new") and MODELS[name][0] != "gpt2":
                continue
            try:
                r = time_variant(
                    name,
                    variant,
                    steps=args.steps,
                    warmup=args.warmup,
                    device=device,
                    batch_mult=args.batch_mult,
                    profile=variant in args.profile,
                )
            except Exception as e:  # noqa: BLE001  (report and go on: one failing variant must not hide the others)
                r = {"model": name, "variant": variant, "error": f"{type(e).__name__}: {e}"}
            if peak and "tflops_per_s" in r:
                r["mfu"] = r["tflops_per_s"] / peak
            print(json.dumps(r), flush=True)
            rows.append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    checks = {"nccl_all_reduce": float(probe.sum())}
    if not args.skip_checks:
        checks.update(
            growth=growth_check(device, args.smoke),
            ki_bf16=ki_bf16_check(device, 512 if args.smoke else 50257),
        )
    print(json.dumps(checks), flush=True)
    dist.destroy_process_group()

    import transformers

    result = {
        "gpu": gpu,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": rows,
        "checks": checks,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# GPU throughput of the stage's training step ({gpu})",
        "",
        (
            f"torch {torch.__version__}, transformers {transformers.__version__}, {args.steps} timed steps "
            "after "
            f"{args.warmup} warm-up; MFU against a dense bf16 peak of {peak} TFLOP/s; model FLOPs as in "
            "flops.md (teacher forward charged for KI)."
        ),
        "",
        "| model | variant | batch x seq | step (ms) | tokens/s | TFLOP/s | MFU | peak mem (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error'][:80]} | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['batch']} x {r['seq_len']} | {r['step_s'] * 1e3:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tflops_per_s']:.1f} | {mfu} | {r['peak_mem_gib']:.1f} |"
        )
    mfus = [r["mfu"] for r in rows if "mfu" in r]
    if mfus:
        lines += [
            "",
            (
                f"Goal: {GOAL_MFU:.0%} MFU: {'met' if max(mfus) >= GOAL_MFU else 'missed'} (best "
                f"{max(mfus):.1%}; "
                f"one timing per variant, no spread)."
            ),
        ]
    lines += [
        "",
        f"Checks on the GPU: NCCL all-reduce over one rank "
        f"({'ok' if checks['nccl_all_reduce'] == 4.0 else 'WRONG'})" + ("." if args.skip_checks else ""),
    ]
    if not args.skip_checks:
        g = checks["growth"]
        lines[-1] += (
            f"; growth 6x384 -> 12x768 max logit error BERT {g['bert']['max_logit_error']:.1e}, GPT-2 "
            f"{g['gpt2']['max_logit_error']:.1e} (float32); KI loss on bf16 logits vs float32: relative "
            f"error {checks['ki_bf16']['rel_error']:.1e}."
        )
    for r in rows:
        if r.get("top_kernels"):
            lines += [
                "",
                f"Top kernels, {r['model']} {r['variant']} ({r['batch']} x {r['seq_len']}):",
                "",
                "| kernel | ms/step | share | calls/step |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| `{k['name']}` | {k['ms_per_step']:.2f} | {k['share']:.1%} | {k['calls_per_step']:.0f} |"
                for k in r["top_kernels"]
            ]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
