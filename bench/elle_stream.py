"""ELLE against the lifelong baselines on the real five-domain stream, in the real pipeline.

    python bench/elle_stream.py [--arch bert gpt2] [--steps 150] [--methods ...] [--resume]

Every method is ``configs/elle_stream_<arch>.yaml`` plus its overlay from ``configs/methods/``, run with
``run_lifelong`` (Ray Train stages, Ray Data streams) on one local Ray cluster, with the same tokenizer,
data order and seed:
- ``elle`` and its ablations train ``--steps`` steps per stage (plus FRW after each growth);
- the fixed-size streaming baselines (naive, er, logit_kd, joint and elle_no_growth) get, stage by
  stage, the training FLOPs ELLE spent (so more steps at the initial size);
- ``scratch_large`` sees the same tokens as ELLE (its steps, FRW included) at the final size from the start.

Writes bench/results/elle_stream.json (``{arch: {method: {ppl_matrix, AP, AP_plus, flops, ...}}}``), a
Markdown table and elle_stream_ap.png (AP against cumulative FLOPs). ``--resume`` continues the runs of
an interrupted benchmark (each run resumes from its last finished stage and checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CORPUS, REPO, write
from bench.partial import save_partial

DOMAINS = ["wb", "news", "reviews", "bio", "cs"]
ELLE_FIRST = ["elle", "elle_no_prompts", "elle_no_frw", "elle_carry"]  # their steps are fixed
FLOP_MATCHED = ["naive", "er", "logit_kd", "joint", "elle_no_growth"]  # steps from ELLE's FLOPs
METHODS = ELLE_FIRST + ["scratch_large"] + FLOP_MATCHED
EXTRA: list[str] = []  # --set key=value overrides for every run (smoke tests, other budgets)
OWN_MEMORY = False  # --own-memory: each method writes its own replay memory (methods side by side)
BASE = (
    "configs/elle_stream_{arch}.yaml"  # --base: the base config ({arch} filled in), e.g. the GPU schedule's
)


def base_config(arch: str) -> Path:
    return REPO / BASE.format(arch=arch)


def overrides(arch: str, out: Path, tok_dir: str | None, steps: list[int], domains: list[str]) -> list[str]:
    from ray_lifelong.config import load_config

    base = load_config(base_config(arch), [f"model.arch={arch}"])
    grows = {d.name: d.grow for d in base.data.domains}
    doms = []
    for name, n in zip(domains, steps):
        g = grows.get(name)
        grow = (
            ""
            if g is None
            else (
                f", grow: {{num_layers: {g.num_layers}, hidden_size: {g.hidden_size}, "
                f"intermediate_size: {g.intermediate_size}, depth_init: {g.depth_init}, "
                f"noise_std: {g.noise_std}, optimizer: {g.optimizer}}}"
            )
        )
        doms.append(
            f"{{name: {name}, steps: {n}, train: ['{CORPUS}/{name}/train.jsonl.gz'], "
            f"valid: ['{CORPUS}/{name}/valid.jsonl.gz']{grow}}}"
        )
    # model.arch: one base config may serve both architectures (configs/elle_stream_gpu.yaml)
    ov = [f"output_dir={out}", f"model.arch={arch}", f"data.domains=[{', '.join(doms)}]", *EXTRA]
    if tok_dir:
        ov.append(f"tokenizer.path={tok_dir}")
    return ov


def run_method(
    arch: str, method: str, out: Path, tok_dir: str | None, steps: list[int], domains: list[str], resume: bool
) -> dict:
    from ray_lifelong.config import load_config
    from ray_lifelong.pipeline import run_lifelong

    cfg = load_config(
        base_config(arch),
        overrides(arch, out, tok_dir, steps, domains)
        + [str(REPO / f"configs/methods/{method}.yaml"), f"run_name={arch}-{method}"],
    )
    # a memory depends only on the data, tokenizer, seed and prompts, not on the method: share it, unless
    # methods run side by side (two runs writing one memory at once would race)
    kind = method if OWN_MEMORY else ("prompts" if cfg.continual.prompts else "plain")
    cfg.continual.replay.memory_path = str(out / f"memory-{arch}-{kind}")
    t0 = time.perf_counter()
    res = run_lifelong(cfg, resume=resume)
    return {
        "ppl_matrix": res["ppl_matrix"],
        "AP": res["AP"],
        "AP_plus": res["AP_plus"],
        "flops": res["cumulative_flops"],
        "stage_flops": [s["stage_flops"] for s in res["stages"]],
        "steps": [s["steps"] + (s["frw"]["steps"] if "frw" in s else 0) for s in res["stages"]],
        "wall_s": [s["stage_wall_time_s"] for s in res["stages"]],
        "bench_wall_s": time.perf_counter() - t0,
        "final_sizes": res["stages"][-1]["model_sizes"],
        "run_dir": str(out / cfg.run_name),
    }


def plan(arch: str, method: str, out: Path, tok_dir: str, steps: list[int], domains: list[str]) -> list[dict]:
    """The steps and training FLOPs per stage that ``method`` will spend with these steps
    (flops.planned_stages)."""
    from ray_lifelong.config import load_config
    from ray_lifelong.data.tokenizer import load_tokenizer
    from ray_lifelong.flops import planned_stages
    from ray_lifelong.models.build import padded_vocab

    cfg = load_config(
        base_config(arch),
        overrides(arch, out, tok_dir, steps, domains) + [str(REPO / f"configs/methods/{method}.yaml")],
    )
    return planned_stages(cfg, padded_vocab(len(load_tokenizer(tok_dir)), cfg.model.vocab_multiple))


def flops_per_step(arch: str, domains: list[str], out: Path, tok_dir: str) -> float:
    """Training FLOPs of one step at the initial size (flops.md), for the FLOP-matched baselines."""
    return plan(arch, "naive", out, tok_dir, [1] * len(domains), domains)[0]["flops"]


def prepare_arch_tokenizer(arch: str, out: Path, domains: list[str]) -> str:
    """One tokenizer per architecture, trained once into ``out`` and shared by every method."""
    from ray_lifelong.config import load_config
    from ray_lifelong.data.run_tokenizer import prepare_tokenizer

    return prepare_tokenizer(
        load_config(base_config(arch), overrides(arch, out, None, [1] * len(domains), domains)),
        out / f"tokenizer-{arch}",
    )


def prepare_packed(arch: str, out: Path, domains: list[str]) -> None:
    """Under ``data.pretokenize``, pack every domain into the shared ``data.packed_path`` once, with and
    without prompts, so that drivers started side by side find them instead of each packing its own."""
    from ray_lifelong.config import load_config
    from ray_lifelong.pipeline import pack_domains

    cfg = load_config(
        base_config(arch), overrides(arch, out, str(out / f"tokenizer-{arch}"), [1] * len(domains), domains)
    )
    if not cfg.data.pretokenize:
        return
    if not cfg.data.packed_path:
        sys.exit("--prepare-only packs for runs side by side: give them one data.packed_path (--set)")
    pack_domains(cfg, prompts=(True, False))


def run_arch(arch: str, args, out: Path) -> dict:
    domains = args.domains
    tok_dir = prepare_arch_tokenizer(arch, out, domains)
    steps = [args.steps] * len(domains)
    partial = out / f"partial-{arch}.json"
    # --resume keeps the methods that finished (a later invocation adds methods without rerunning them);
    # --rerun drops a method's entry and run directory so that it trains again from scratch
    results: dict[str, dict] = json.loads(partial.read_text()) if args.resume and partial.exists() else {}
    for method in args.rerun:
        results.pop(method, None)
        shutil.rmtree(out / f"{arch}-{method}", ignore_errors=True)
    chosen = args.methods_of.get(arch, args.methods)
    for method in [m for m in METHODS if m in chosen]:
        if method in results:
            print(f"[bench] {arch} {method}: finished earlier, kept", flush=True)
            continue
        if method in FLOP_MATCHED or method == "scratch_large":
            if args.match == "planned":  # ELLE's budget from its config: no need to wait for its run
                ref = plan(arch, "elle", out, tok_dir, steps, domains)
                ref_flops, ref_steps = [p["flops"] for p in ref], [p["steps"] for p in ref]
            elif "elle" in results:
                ref_flops, ref_steps = results["elle"]["stage_flops"], results["elle"]["steps"]
            else:
                sys.exit(
                    f"{arch} {method} is matched to the elle run: add elle to the methods (or finish it "
                    f"first), or match its planned budget (--match planned)"
                )
        if method in FLOP_MATCHED:
            per_step = flops_per_step(arch, domains, out, tok_dir)
            m_steps = [max(1, round(f / per_step)) for f in ref_flops]
        elif method == "scratch_large":
            m_steps = ref_steps
        else:
            m_steps = steps
        print(f"[bench] {arch} {method}: steps per stage {m_steps}", flush=True)
        results[method] = run_method(arch, method, out, tok_dir, m_steps, domains, args.resume)
        results = save_partial(partial, method, results[method])
    return results


# the methods each goal compares ELLE with; a goal is decided only when every one of them ran
# the baselines (joint: an upper reference)
AP_RIVALS = (
    "naive",
    "er",
    "logit_kd",
    "scratch_large",
    "elle_no_growth",
)
AP_PLUS_RIVALS = ("naive", "er")


def goals(r: dict) -> dict:
    """The goals, checked on the final stage. A goal is ``None`` (undecided) unless ELLE and every method it
    compares with ran: a partial set can neither pass nor fail it.

    - ``elle_lowest_final_AP``: ELLE's final AP below every baseline's (``AP_RIVALS``; the ablations are
    ELLE's
      own variants and joint is the upper reference, so neither counts);
    - ``elle_AP_plus_below_naive_and_er``: ELLE forgets less (final AP+) than naive and ER;
    - with scratch_large: ELLE's final AP against it, ELLE's FLOPs as a share of its, and whether ELLE
    reaches its
      AP within 60% of its FLOPs.
    """

    def ran(methods) -> bool:
        return "elle" in r and all(m in r for m in methods)

    out = {
        "elle_lowest_final_AP": (
            all(r["elle"]["AP"][-1] < r[m]["AP"][-1] for m in AP_RIVALS) if ran(AP_RIVALS) else None
        ),
        "elle_AP_plus_below_naive_and_er": (
            all(r["elle"]["AP_plus"][-1] < r[m]["AP_plus"][-1] for m in AP_PLUS_RIVALS)
            if ran(AP_PLUS_RIVALS)
            else None
        ),
    }
    if ran(["scratch_large"]):
        e, s = r["elle"], r["scratch_large"]
        target = s["AP"][-1]
        out["elle_final_AP_vs_scratch_large"] = [e["AP"][-1], target]
        out["elle_flops_over_scratch_large"] = e["flops"][-1] / s["flops"][-1]
        out["elle_reaches_scratch_large_AP_within_60pct_flops"] = (
            e["AP"][-1] <= target and out["elle_flops_over_scratch_large"] <= 0.6
        )
    return out


def verdict(value) -> str:
    """met / missed / undecided for a goal flag (other values are shown as they are)."""
    if value is None:
        return "undecided"
    if isinstance(value, bool):
        return "met" if value else "missed"
    if isinstance(value, list):
        return " vs. ".join(f"{x:.1f}" for x in value)
    return f"{value:.3f}" if isinstance(value, float) else json.dumps(value)


def goal_lines(r: dict) -> list[str]:
    """One line per goal: its verdict, and for an undecided one the methods that did not run."""
    missing = {"elle_lowest_final_AP": AP_RIVALS, "elle_AP_plus_below_naive_and_er": AP_PLUS_RIVALS}
    lines = []
    for name, value in goals(r).items():
        absent = [m for m in ("elle", *missing.get(name, ())) if m not in r]
        why = f" ({', '.join(absent)} did not run)" if value is None and absent else ""
        lines.append(f"- {name}: {verdict(value)}{why}")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, (arch, r) in zip(axes[0], results.items()):
        for method, v in r.items():
            ax.plot(
                [f / 1e12 for f in v["flops"]],
                v["AP"],
                marker="o",
                label=method,
                lw=2.5 if method == "elle" else 1,
            )
        ax.set_xlabel("cumulative training TFLOPs (FRW, replay and teachers included)")
        ax.set_ylabel(f"{arch}: AP (geometric mean PPL over domains seen)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _series(values) -> str:
    return " / ".join("-" if x is None else f"{x:.1f}" for x in values)  # AP+ has no value after stage 0


def table(results: dict, args) -> str:
    lines = [
        "# ELLE on the five-domain stream",
        "",
        (
            f"Domains {' -> '.join(args.domains)} (../shared/corpus), {args.steps} steps per stage for ELLE; "
            f"fixed-size baselines FLOP-matched to ELLE stage by stage; scratch_large token-matched. "
            f"Configs: {args.base.replace('{arch}', '<arch>')} + configs/methods/<method>.yaml."
        ),
        "",
    ]
    for arch, r in results.items():
        lines += [
            f"## {arch}",
            "",
            "| method | AP per stage | AP+ per stage | final TFLOPs | steps | wall s |",
            "|---|---|---|---|---|---|",
        ]
        for m, v in r.items():
            lines.append(
                f"| {m} | {_series(v['AP'])} | {_series(v['AP_plus'])} | {v['flops'][-1] / 1e12:.2f} | "
                f"{sum(v['steps'])} | {sum(v['wall_s']):.0f} |"
            )
        lines += ["", "Goals (one run per method, no spread):", *goal_lines(r), ""]
        for m, v in r.items():  # row i: perplexities after stage i; columns: the domains in stream order
            lines += [
                f"{arch} / {m}: perplexity matrix",
                "",
                "| after | " + " | ".join(args.domains) + " |",
                "|---" * (len(args.domains) + 1) + "|",
            ]
            lines += [
                f"| {args.domains[i]} | " + " | ".join(f"{x:.0f}" for x in row) + " |"
                for i, row in enumerate(v["ppl_matrix"])
            ]
            lines.append("")
    lines.append("![AP vs FLOPs](elle_stream_ap.png)")
    return "\n".join(lines)


def main() -> None:
    global BASE, OWN_MEMORY
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["bert", "gpt2"])
    ap.add_argument("--steps", type=int, default=150, help="ELLE's steps per stage")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--domains", nargs="+", default=DOMAINS)
    ap.add_argument("--out", default=None, help="work directory (default: a fresh temp dir)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue interrupted runs and keep the methods already in partial-<arch>.json",
    )
    ap.add_argument(
        "--rerun", nargs="*", default=[], help="with --resume: train these methods again from scratch"
    )
    ap.add_argument("--name", default="elle_stream")
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides applied to every run")
    ap.add_argument(
        "--methods-of",
        nargs="*",
        default=[],
        metavar="ARCH=M1,M2",
        help="the methods of one architecture (e.g. bert=elle,naive,er): fewer runs where time is short",
    )
    ap.add_argument(
        "--base",
        default=BASE,
        help="base config, {arch} filled in where it has one (e.g. configs/elle_stream_gpu.yaml)",
    )
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument(
        "--address", default=None, help="join this Ray cluster (e.g. auto) instead of starting one"
    )
    ap.add_argument(
        "--match",
        choices=["run", "planned"],
        default="run",
        help="match the baselines to ELLE's finished run (run) or to the budget its config plans "
        "(planned: the same numbers, flops.planned_stages, without waiting for ELLE)",
    )
    ap.add_argument(
        "--own-memory",
        action="store_true",
        help="each method writes its own replay memory (for invocations running side by side)",
    )
    ap.add_argument(
        "--prepare-only",
        action="store_true",
        help="train the tokenizers into --out (and under data.pretokenize pack the domains into "
        "data.packed_path) and stop, before invocations that run side by side",
    )
    ap.add_argument(
        "--no-report",
        action="store_true",
        help="train and keep partial-<arch>.json only (parallel invocations; --report-only at the end)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the finished runs in --out (partial-<arch>.json), train nothing",
    )
    args = ap.parse_args()
    args.methods_of = {k: v.split(",") for k, v in (item.split("=", 1) for item in args.methods_of)}
    EXTRA.extend(args.set)
    BASE, OWN_MEMORY = args.base, args.own_memory
    if args.rerun and not args.resume:
        sys.exit("--rerun goes with --resume (without it every method trains from scratch anyway)")
    if (
        "elle" not in args.methods
        and not args.resume
        and args.match == "run"
        and set(args.methods) & set(FLOP_MATCHED + ["scratch_large"])
    ):
        sys.exit("the FLOP- and token-matched baselines need the elle run: add elle to --methods")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import tempfile

    import ray

    from ray_lifelong.data.stream import quiet_ray_data

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-elle-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        for arch in args.arch:
            print(f"[bench] {arch} tokenizer: {prepare_arch_tokenizer(arch, out, args.domains)}")
    if args.report_only:  # e.g. after a run that ended before its report, or with fewer methods than planned
        results = {
            a: json.loads((out / f"partial-{a}.json").read_text())
            for a in args.arch
            if (out / f"partial-{a}.json").exists()
        }
        if not results:
            sys.exit(f"no finished runs in {out} (partial-<arch>.json) to report")
        meta = {
            "goals": {a: goals(r) for a, r in results.items()},
            "setup": {**vars(args), "report_only": True},
        }
        plot(results, REPO / f"bench/results/{args.name}_ap.png")
        write(
            args.name,
            results,
            table(results, args).replace("elle_stream_ap.png", f"{args.name}_ap.png"),
            meta,
        )
        return
    env = {
        "env_vars": {
            k: os.environ[k] for k in ("HF_HUB_OFFLINE", "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_DATA_LOG_LEVEL")
        }
    }
    if args.address:  # a running cluster shared by several invocations (bench/gpu_elle_stream.sh)
        if args.address != "auto":  # Ray Train's helper actors look the cluster up again: not "auto" where
            env["env_vars"]["RAY_ADDRESS"] = args.address  # other clusters run on the same machine
        ray.init(address=args.address, configure_logging=False, runtime_env=env)
    else:
        # "local": a cluster of its own, even where `ray start` left a cluster (or its address file) behind
        ray.init(address="local", num_cpus=args.num_cpus, configure_logging=False, runtime_env=env)
    quiet_ray_data()
    if args.prepare_only:
        for arch in args.arch:
            prepare_packed(arch, out, args.domains)
        return
    t0 = time.time()
    results = {arch: run_arch(arch, args, out) for arch in args.arch}
    if args.no_report:
        return
    meta = {
        "goals": {a: goals(r) for a, r in results.items()},
        "setup": {**vars(args), "wall_s": time.time() - t0},
    }
    plot(results, REPO / f"bench/results/{args.name}_ap.png")
    write(args.name, results, table(results, args).replace("elle_stream_ap.png", f"{args.name}_ap.png"), meta)


if __name__ == "__main__":
    main()
