"""Llama-family growth: exactness per case, and the cost of growing a 12/768 Llama to 24/1536 on CPU.

    python bench/growth_llama.py [--reps 3]

1. Exactness: max |logit difference| (float32, 4 x 64 random token ids) between a Llama and the model
   ``expand`` grows from it, per case (depth only, FFN only, heads and KV heads, integer and non-integer
   hidden width, combined; tied and untied output layer; Mistral and Qwen2 once each). The model has
   4 layers, hidden 384, 8 query heads on 4 KV heads of size 48, FFN 1024, vocabulary 4000, and its weights
   are moved away from their initialisation (N(0, 0.02^2) added to every weight, RMSNorm gains drawn from
   U(0.5, 1.5)). Goal: at most 1e-5 in every exact case.
2. Cost: ``expand`` of a Llama with 12 layers, hidden 768, 12 heads on 4 KV heads, FFN 2048 and vocabulary
   32000 (untied) to 24 layers, hidden 1536, 24 heads on 8 KV heads, FFN 4096 (identity blocks, zero-write
   width growth), each repetition in a fresh process with the machine's CPU threads. Wall seconds (goal
   < 5 s), CPU seconds of the process, and the peak memory the growth adds (goal < 2.5 x the grown
   model's parameter bytes), as median and min-max over the repetitions.

   Memory is measured as RSS, not with tracemalloc: tensors are allocated by torch's CPU allocator, which
   tracemalloc (Python's own allocator only) does not see. In the fresh process, after the input model is
   built, the current RSS is read from /proc/self/statm; after ``expand``, ``ru_maxrss`` (the process's
   high-water RSS) minus that RSS is the peak the growth added, provided the high-water mark was set during
   the growth (checked: ``ru_maxrss`` rose during it). It counts touched pages, so it includes the grown
   model's own parameters: the ratio to their bytes cannot be below 1.

The machine is shared: the 1-minute load average is recorded with each repetition, and the CPU seconds are
given next to the wall seconds because they depend far less on the other processes.

Writes bench/results/growth_llama.json and growth_llama.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, write

GOAL_SECONDS = 5.0
GOAL_PEAK_RATIO = 2.5
GOAL_EXACT = 1e-5
# LlamaConfig wants the hidden size to be a multiple of the head count, so 384 (8, 12 and 16 heads)
SMALL = {"num_hidden_layers": 4, "hidden_size": 384, "num_attention_heads": 8, "num_key_value_heads": 4,
         "head_dim": 48, "intermediate_size": 1024}
COST_FROM = {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "num_key_value_heads": 4,
             "intermediate_size": 2048}
COST_TO = {"num_hidden_layers": 24, "hidden_size": 1536, "num_attention_heads": 24, "num_key_value_heads": 8,
           "intermediate_size": 4096}
# case -> (expand keywords, exact by construction)
CASES = {
    "depth only (4 -> 8 layers, identity blocks)": ({"num_hidden_layers": 8}, True),
    "depth on top (4 -> 6 layers)": ({"num_hidden_layers": 6, "depth_placement": "top"}, True),
    "FFN only (1024 -> 1500)": ({"intermediate_size": 1500}, True),
    "heads + KV heads (8/4 -> 12/6)": ({"num_attention_heads": 12, "num_key_value_heads": 6}, True),
    "heads, larger groups (8/4 -> 16/4)": ({"num_attention_heads": 16}, True),
    "hidden x2 (384 -> 768)": ({"hidden_size": 768}, True),
    "hidden x1.5 (384 -> 576)": ({"hidden_size": 576}, True),
    "hidden x1.25 (384 -> 480)": ({"hidden_size": 480}, True),
    "hidden x1.04 (384 -> 400)": ({"hidden_size": 400}, True),
    "combined (4/384/8/4/1024 -> 8/576/12/6/1536)": (
        {"num_hidden_layers": 8, "hidden_size": 576, "num_attention_heads": 12, "num_key_value_heads": 6,
         "intermediate_size": 1536}, True),
    "combined + noise 0.01 on copied entries": (
        {"num_hidden_layers": 8, "hidden_size": 576, "num_attention_heads": 12, "num_key_value_heads": 6,
         "intermediate_size": 1536, "noise_std": 0.01}, True),
    "copy depth (ELLE's copy, not exact; for reference)": (
        {"num_hidden_layers": 8, "depth_init": "copy"}, False),
}


def _small(arch: str, tied: bool):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    cfg_cls, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                    "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = cfg_cls(vocab_size=4000, max_position_embeddings=128, tie_word_embeddings=tied, **SMALL)
    torch.manual_seed(0)
    model = cls(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def exactness() -> list[dict]:
    from ray_lifelong.growth import expand, logit_errors

    rows = []
    for tied in (True, False):
        model = _small("llama", tied)
        for case, (kw, exact) in CASES.items():
            err = logit_errors(model, expand(model, **kw), batch_size=4, seq_len=64)
            rows.append({"case": case, "model": "llama", "tied": tied, "exact_by_construction": exact,
                         "max_abs": err["max_abs"], "logit_std": err["ref_std"], "kl": err["kl"]})
    combined = CASES["combined (4/384/8/4/1024 -> 8/576/12/6/1536)"][0]
    for arch, tied in (("mistral", False), ("qwen2", True)):
        model = _small(arch, tied)
        err = logit_errors(model, expand(model, **combined), batch_size=4, seq_len=64)
        rows.append({"case": "combined (4/384/8/4/1024 -> 8/576/12/6/1536)", "model": arch, "tied": tied,
                     "exact_by_construction": True, "max_abs": err["max_abs"], "logit_std": err["ref_std"],
                     "kl": err["kl"]})
    return rows


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cost_child() -> None:
    """Runs in a fresh process: ``ru_maxrss`` is per process and only ever rises."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from ray_lifelong.growth import expand

    hf_logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = LlamaConfig(vocab_size=32000, tie_word_embeddings=False, **COST_FROM)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    rss0 = _rss_mib()
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    grown = expand(model, **COST_TO)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in grown.parameters())
    grown_mib = sum(p.numel() * p.element_size() for p in grown.parameters()) / 2**20
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "extra_peak_mib": max1 - rss0,
                      "peak_set_during_growth": max1 > max0, "rss_before_mib": rss0, "grown_params": params,
                      "grown_mib": grown_mib, "peak_ratio": (max1 - rss0) / grown_mib, "load_avg_1min": load,
                      "threads": torch.get_num_threads()}))


def cost(reps: int) -> list[dict]:
    out = []
    for _ in range(reps):
        res = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def _stats(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "all": vals}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.child:
        return cost_child()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    exact = exactness()
    runs = cost(args.reps)
    secs = _stats([r["seconds"] for r in runs])
    cpus = _stats([r["cpu_seconds"] for r in runs])
    ratio = _stats([r["peak_ratio"] for r in runs])
    peak = _stats([r["extra_peak_mib"] for r in runs])
    worst = max(r["max_abs"] for r in exact if r["exact_by_construction"])
    goals = {
        "exact_max_logit_error_le_1e-5": {"value": worst, "met": worst <= GOAL_EXACT},
        "expand_seconds_lt_5": {"value": secs["median"], "met": secs["median"] < GOAL_SECONDS},
        "peak_lt_2.5x_grown_bytes": {"value": ratio["median"], "met": ratio["median"] < GOAL_PEAK_RATIO},
    }
    payload = {"exactness": exact, "cost": {"from": COST_FROM, "to": COST_TO, "vocab": 32000, "tied": False,
                                            "runs": runs, "seconds": secs, "cpu_seconds": cpus,
                                            "extra_peak_mib": peak, "peak_ratio": ratio},
               "goals": goals}

    def verdict(g: dict) -> str:
        return "**met**" if g["met"] else "**missed**"

    loads = [r["load_avg_1min"] for r in runs]
    lines = [
        "# Llama growth benchmark", "",
        f"Goals: exact cases within {GOAL_EXACT:g}: {verdict(goals['exact_max_logit_error_le_1e-5'])} (worst "
        f"{worst:.2e}); grow 12/768 -> 24/1536 in under {GOAL_SECONDS:g} s: "
        f"{verdict(goals['expand_seconds_lt_5'])} (median {secs['median']:.2f} s, {secs['min']:.2f}-"
        f"{secs['max']:.2f} s over {len(runs)} runs, 1-minute load average {min(loads):.1f}-"
        f"{max(loads):.1f} on {os.cpu_count()} CPUs); extra peak memory under {GOAL_PEAK_RATIO:g} x the "
        "grown model's bytes: "
        f"{verdict(goals['peak_lt_2.5x_grown_bytes'])} (median {ratio['median']:.2f} x).", "",
        "## Exactness: max |logit difference|, float32", "",
        (f"Llama {SMALL['num_hidden_layers']} layers, hidden {SMALL['hidden_size']}, "
         f"{SMALL['num_attention_heads']} query heads on {SMALL['num_key_value_heads']} KV heads of size "
         f"{SMALL['head_dim']}, FFN {SMALL['intermediate_size']}, vocabulary 4000; weights moved off their "
         "initialisation (N(0, 0.02^2) added, RMSNorm gains U(0.5, 1.5)); 4 x 64 random token ids. Logit std "
         "of the input model in brackets."), "",
        "| case | model | tied | max abs error | goal |", "|---|---|---|---|---|"]
    for r in exact:
        goal = ("met" if r["max_abs"] <= GOAL_EXACT else "**missed**") if r["exact_by_construction"] else \
            "n/a (not exact by design)"
        lines.append(f"| {r['case']} | {r['model']} | {'yes' if r['tied'] else 'no'} | "
                     f"{r['max_abs']:.2e} ({r['logit_std']:.2f}) | {goal} |")
    lines += [
        "", f"## Cost of expand() on CPU: 12/768 -> 24/1536 ({runs[0]['grown_params']:,} parameters, "
        f"{runs[0]['grown_mib']:.0f} MiB in float32)", "",
        ("From 12 layers, hidden 768, 12 heads on 4 KV heads, FFN 2048, vocabulary 32000, untied, to 24 "
         "layers, hidden 1536, 24 heads on 8 KV heads, FFN 4096; identity blocks, zero-write width growth. "
         f"One fresh process per run, {runs[0]['threads']} torch threads. Extra peak = ru_maxrss after "
         "expand() minus the RSS before it (tracemalloc cannot see torch's allocator); it includes the "
         "grown parameters themselves."), "",
        "| run | wall s | CPU s | extra peak MiB | x grown bytes | peak set during growth | load avg 1 min |",
        "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['extra_peak_mib']:.0f} | "
                     f"{r['peak_ratio']:.2f} | {'yes' if r['peak_set_during_growth'] else 'no'} | "
                     f"{r['load_avg_1min']:.1f} |")
    lines += [f"| median (min-max) | {secs['median']:.2f} ({secs['min']:.2f}-{secs['max']:.2f}) | "
              f"{cpus['median']:.2f} ({cpus['min']:.2f}-{cpus['max']:.2f}) | "
              f"{peak['median']:.0f} ({peak['min']:.0f}-{peak['max']:.0f}) | "
              f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f}) | | |"]
    write("growth_llama", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
