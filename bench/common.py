"""Shared pieces of the backbone benchmarks: workloads, a plain PyTorch baseline loop, a Ray stage run.

Every benchmark compares against a baseline measured in the same run (ratios), because the machines
are shared and noisy. Results go to ``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# BENCH_CORPUS points elsewhere where ../shared is not beside the checkout (e.g. a copy carried to a GPU
# machine)
CORPUS = Path(os.environ.get("BENCH_CORPUS") or REPO.parent / "shared" / "corpus")


@dataclass
class Workload:
    name: str
    overrides: list[str]


def workloads(out: Path) -> list[Workload]:
    """The demo model on the demo data, and a mid-size model on a real domain (when ../shared exists)."""
    demo_dir = out / "demo_data"
    demo = Workload(
        "demo (bert 2x64, demo 'sports')",
        [
            "demo.enabled=true",
            f"demo.dir={demo_dir}",
            "demo.domains=[sports]",
            "demo.train_docs=20000",
            (
                f"data.domains=[{{name: sports, train: ['{demo_dir}/sports/train-*.jsonl.gz'], "
                f"valid: ['{demo_dir}/sports/valid-*.jsonl.gz']}}]"
            ),
        ],
    )
    found = [demo]
    if (CORPUS / "wb" / "train.jsonl.gz").exists():
        found.append(
            Workload(
                "mid-size (bert 4x256, corpus 'wb')",
                [
                    "model.num_layers=4",
                    "model.hidden_size=256",
                    "model.num_heads=4",
                    "model.intermediate_size=1024",
                    "data.seq_len=128",
                    "tokenizer.vocab_size=8000",
                    "tokenizer.sample_docs_per_domain=300",
                    (
                        f"data.domains=[{{name: wb, train: ['{CORPUS}/wb/train.jsonl.gz'], "
                        f"valid: ['{CORPUS}/wb/valid.jsonl.gz']}}]"
                    ),
                ],
            )
        )
    return found


def base_overrides(out: Path, steps: int, threads: int) -> list[str]:
    return [
        f"output_dir={out}",
        f"train.steps={steps}",
        "train.batch_size=16",
        "train.micro_batch_size=16",
        "train.log_every=5",
        f"train.checkpoint_every={steps + 1}",
        f"train.torch_threads={threads}",
        "data.eval_max_sequences=16",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=1",
    ]


def packed_rows(cfg, tok_dir: str, n_rows: int) -> np.ndarray:
    """The same packed sequences the Ray pipeline produces, made in-process (no Ray) for the baseline."""
    from ray_lifelong.data.sources import iter_documents, resolve_sources
    from ray_lifelong.data.stream import TokenizePack

    dom = cfg.data.domains[0]
    udf = TokenizePack(tok_dir, cfg.data.seq_len, cfg.model.arch)
    rows: list[np.ndarray] = []
    texts: list[str] = []

    def flush() -> None:
        rows.append(
            udf({"text": np.array(texts, dtype=object), "domain_id": np.zeros(len(texts), np.int32)})[
                "input_ids"
            ]
        )
        texts.clear()

    for f in resolve_sources(dom.train, "bench"):
        for text in iter_documents(f):
            texts.append(text)
            if len(texts) == 128:
                flush()
                if sum(map(len, rows)) >= n_rows:
                    return np.concatenate(rows)[:n_rows]
    if texts:
        flush()
    return np.concatenate(rows)[:n_rows]


def plain_torch_loop(cfg, tok_dir: str, rows: np.ndarray, steps: int, warmup: int, threads: int) -> dict:
    """The stage's training step without Ray: same model, optimizer, masking, batch and data."""
    from ray_lifelong.data.tokenizer import load_tokenizer
    from ray_lifelong.models.build import LMObjective, build_model, lm_loss
    from ray_lifelong.stage.step import Masker, build_optimizer

    torch.set_num_threads(threads)
    t = cfg.train
    tok = load_tokenizer(tok_dir)
    model = build_model(cfg.model, len(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=t.seed)
    obj = LMObjective(model).train()
    opt = build_optimizer(model, t.lr, t)
    masker = Masker(tok, cfg.data.mlm_probability, cfg.model.arch)
    b = t.batch_size
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        i = (step * b) % max(1, len(rows) - b)
        batch = torch.from_numpy(rows[i : i + b].astype(np.int64))
        inputs, labels = masker(batch, torch.Generator().manual_seed(step))
        logits, targets = obj(inputs, labels)
        lm_loss(logits, targets).backward()
        torch.nn.utils.clip_grad_norm_(obj.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    n = steps - warmup
    return {"steps_per_s": n / dt, "tokens_per_s": n * b * cfg.data.seq_len / dt, "steps_timed": n}


def ray_stage(cfg, tok_dir: str, warmup: int, materialize: bool = False) -> dict:
    """One real stage on Ray Train (1 worker); steady-state rates from its log history.

    ``materialize=False`` streams from the Ray Data pipeline (read, tokenize, pack) while training;
    ``True`` tokenizes the same rows first, to isolate Ray Train's own overhead.
    """
    from ray_lifelong.data.stream import BadRecordLog, StreamOptions, files_dataset, validation_rows
    from ray_lifelong.stage.run import run_stage
    from ray_lifelong.stage.spec import StageSpec, read_tokenizer_files

    dom = cfg.data.domains[0]
    spec = StageSpec(
        cfg=cfg,
        index=0,
        domain=dom.name,
        eval_domains=[dom.name],
        steps=cfg.train.steps,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        tokenizer_files=read_tokenizer_files(tok_dir),
    )
    log = BadRecordLog.remote()
    valid = validation_rows(cfg.data.domains, StreamOptions(tok_dir, cfg.model.arch, cfg.data), log)
    storage = str(Path(cfg.output_dir) / f"ray-{time.time_ns()}")
    train_ds = None
    if materialize:
        train_ds = files_dataset([(0, dom)], "train", StreamOptions(tok_dir, cfg.model.arch, cfg.data))
        train_ds = train_ds.limit((cfg.train.steps + 1) * cfg.train.batch_size).materialize()
    res = run_stage(
        spec, tokenizer_dir=tok_dir, storage_path=storage, valid=valid, bad_log=log, train_ds=train_ds
    )
    hist = [h for h in res.history if h["step"] > warmup]
    first = next(h for h in res.history if h["step"] == warmup)
    span = sum(h["interval_s"] for h in hist)
    steps = hist[-1]["step"] - first["step"]
    wait = hist[-1]["data_wait_s"] - first["data_wait_s"]
    return {
        "steps_per_s": steps / span,
        "tokens_per_s": steps * cfg.train.batch_size * cfg.data.seq_len / span,
        "steps_timed": steps,
        "wait_fraction": wait / span,
        "startup_wait_s": first["data_wait_s"],
        "stage_wall_s": res.wall_time_s,
    }


def data_supply(cfg, tok_dir: str, min_rows: int) -> dict:
    """Tokens/s the Ray Data pipeline (read, tokenize, pack) delivers alone, with the stage's resources.

    The rate counts the start-up (conservative): the executor runs ahead of the consumer into the
    object store, so a rate over later batches only measures reading buffered blocks.
    """
    from ray_lifelong.data.stream import StreamOptions, files_dataset

    ds = files_dataset([(0, cfg.data.domains[0])], "train", StreamOptions(tok_dir, cfg.model.arch, cfg.data))
    marks: list[tuple[float, int]] = []
    rows = 0
    t_start = time.perf_counter()
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        rows += len(batch["input_ids"])
        marks.append((time.perf_counter(), rows))
        if rows >= min_rows:
            break
    t_q, r_q = next(m for m in marks if m[1] >= rows // 4)
    t_end = marks[-1][0]
    return {
        "tokens_per_s": rows * cfg.data.seq_len / (t_end - t_start),
        "rows": rows,
        "startup_s": marks[0][0] - t_start,
        "tokens_per_s_after_first_quarter": (rows - r_q) * cfg.data.seq_len / max(t_end - t_q, 1e-9),
    }


def write(name: str, payload: dict, table: str, meta: dict | None = None) -> None:
    """``<name>.json`` and ``<name>.md``. With ``meta`` (goals, setup) the JSON holds ``payload`` exactly, in
    the agreed layout (``{arch: {method: ...}}``), and the rest goes to ``<name>.meta.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    if meta is None:
        payload = {**payload, **machine}
    else:
        (RESULTS / f"{name}.meta.json").write_text(json.dumps({**meta, **machine}, indent=1))
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)


# ---------------------------------------------------------------- in-process curves on the real corpus
# The growth and KI benchmarks compare learning curves (loss against steps and FLOPs), not speed, so
# they train in-process with the stage's own objective, optimizer, masking and schedule: thousands of
# steps fit in the time budget, and the Ray overhead is measured separately (backbone.py).


def corpus_setup(arch: str, out: Path, domain: str = "wb", vocab_size: int = 4000, seq_len: int = 128):
    """A config, trained tokenizer directory and masker for ``arch`` on one corpus domain."""
    from ray_lifelong.config import load_config
    from ray_lifelong.data.run_tokenizer import prepare_tokenizer
    from ray_lifelong.data.tokenizer import load_tokenizer
    from ray_lifelong.stage.step import Masker

    dom = (
        f"{{name: {domain}, train: ['{CORPUS}/{domain}/train.jsonl.gz'], "
        f"valid: ['{CORPUS}/{domain}/valid.jsonl.gz']}}"
    )
    cfg = load_config(
        REPO / "configs/demo.yaml",
        [
            "demo.enabled=false",
            f"data.domains=[{dom}]",
            f"model.arch={arch}",
            f"data.seq_len={seq_len}",
            f"tokenizer.vocab_size={vocab_size}",
            "tokenizer.sample_docs_per_domain=300",
            f"output_dir={out}",
        ],
    )
    tok_dir = prepare_tokenizer(cfg, out / f"tok-{arch}")
    tok = load_tokenizer(tok_dir)
    return cfg, tok_dir, tok, Masker(tok, cfg.data.mlm_probability, arch)


def corpus_rows(cfg, tok_dir: str, n_train: int, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed training rows and validation rows (from the domain's valid split) as int64 tensors."""
    from dataclasses import replace

    dom = cfg.data.domains[0]
    vdom = replace(dom, train=list(dom.valid))
    vcfg = replace(cfg, data=replace(cfg.data, domains=[vdom]))
    rows = torch.from_numpy(packed_rows(cfg, tok_dir, n_train).astype(np.int64))
    valid = torch.from_numpy(packed_rows(vcfg, tok_dir, n_valid).astype(np.int64))
    return rows, valid


def small_model(arch: str, vocab: int, layers: int, hidden: int, *, seq_len: int = 128, seed: int = 0):
    """A model of ``layers`` x ``hidden`` (64-dim heads, FFN 4x), no dropout, HF init with ``seed``."""
    from ray_lifelong.config import ModelConfig
    from ray_lifelong.models.build import build_model

    torch.manual_seed(seed)
    return build_model(
        ModelConfig(
            arch=arch,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=max(1, hidden // 64),
            intermediate_size=4 * hidden,
            max_position_embeddings=seq_len,
            dropout=0.0,
        ),
        vocab,
        seed=seed,
    )


def train_flops_per_step(
    model, seq_len: int, batch: int, mlm_probability: float = 0.15, forward_only: bool = False
) -> float:
    """flops.md: training = 3 x forward; a frozen teacher costs its forward only."""
    from ray_lifelong.flops import sequence_flops
    from ray_lifelong.growth import model_sizes
    from ray_lifelong.models.build import model_arch

    per_seq = sequence_flops(model_sizes(model), vocab=model.config.vocab_size, seq_len=seq_len,
                             arch=model_arch(model), mlm_probability=mlm_probability, train=not forward_only)
    return batch * per_seq


@torch.no_grad()
def valid_loss(model, valid: torch.Tensor, masker) -> float:
    """Mean token loss on ``valid`` (MLM with fixed per-row masks, so every evaluation scores the same)."""
    from ray_lifelong.models.build import LMObjective, lm_loss

    obj = LMObjective(model).eval()
    tot, n = 0.0, 0
    for i in range(0, len(valid), 32):
        inputs, labels = masker(valid[i : i + 32], None, fixed=True)
        logits, targets = obj(inputs, labels)
        tot += float(lm_loss(logits, targets, reduction="sum"))
        n += targets.numel()
    obj.train()
    return tot / n


@dataclass
class KISetting:
    """Distil from ``teacher`` with the KI loss while the inheritance rate is above 0."""

    teacher: torch.nn.Module
    schedule: str = "linear"
    steps: int = 300
    alpha0: float = 1.0
    temperature: float = 2.0
    top_k: int | None = None


def train_curve(
    model,
    rows: torch.Tensor,
    valid: torch.Tensor,
    masker,
    *,
    steps: int,
    batch: int,
    lr: float,
    cfg_train,
    eval_every: int,
    offset_step: int = 0,
    offset_flops: float = 0.0,
    optimizer=None,
    schedule: tuple[int, int] | None = None,
    ki: KISetting | None = None,
    label: str = "",
):
    """Train ``model`` for ``steps`` on ``rows`` (batch i = rows of step i, the same order for every run);
    return (eval curve, optimizer). Each curve point: step, cumulative FLOPs (teacher forward included),
    validation loss, and for KI the rate alpha.

    ``schedule=(total, offset)`` follows one LR schedule of ``total`` steps from step ``offset`` (staged
    training: a grown phase continues the small phase's schedule instead of warming up again).
    """
    from ray_lifelong.distill import inheritance_rate, ki_loss
    from ray_lifelong.models.build import LMObjective, lm_loss
    from ray_lifelong.stage.schedule import lr_multiplier
    from ray_lifelong.stage.step import build_optimizer

    obj = LMObjective(model).train()
    opt = optimizer or build_optimizer(model, lr, cfg_train)
    total, start = schedule or (steps, 0)
    warm = int(0.06 * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(start + s, total, warmup=warm))
    seq = rows.shape[1]
    fps = train_flops_per_step(model, seq, batch)
    t_obj = None
    if ki is not None:
        t_obj = LMObjective(ki.teacher.eval().requires_grad_(False))
        t_fps = train_flops_per_step(ki.teacher, seq, batch, forward_only=True)
    flops = offset_flops
    curve = [{"step": offset_step, "flops": flops, "valid_loss": valid_loss(model, valid, masker)}]
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        g = offset_step + step
        i = (g * batch) % (len(rows) - batch)
        inputs, labels = masker(rows[i : i + batch], torch.Generator().manual_seed(g))
        logits, targets = obj(inputs, labels)
        alpha = 0.0
        if ki is not None:
            alpha = inheritance_rate(step - 1, schedule=ki.schedule, steps=ki.steps, alpha0=ki.alpha0)
        if alpha > 0:
            with torch.no_grad():
                t_logits = t_obj(inputs, labels)[0]
            loss = ki_loss(logits, t_logits, targets, alpha=alpha, temperature=ki.temperature, top_k=ki.top_k)
            flops += t_fps
        else:
            loss = lm_loss(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(obj.parameters(), cfg_train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        flops += fps
        if step % eval_every == 0 or step == steps:
            curve.append(
                {"step": g, "flops": flops, "valid_loss": valid_loss(model, valid, masker), "alpha": alpha}
            )
            print(
                f"[{label}] step {step}/{steps} valid {curve[-1]['valid_loss']:.3f} alpha {alpha:.2f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    return curve, opt
