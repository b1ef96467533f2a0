"""What one stage needs on the workers, and what it returns to the driver (plain picklable data)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_lifelong.config.plan import frw_steps_before, ki_steps
from ray_lifelong.config.schema import LifelongConfig


@dataclass
class StageSpec:
    """Everything a worker of stage ``index`` needs; sent whole through ``train_loop_config``."""

    cfg: LifelongConfig
    index: int
    domain: str
    eval_domains: list[str]
    steps: int
    batch_size: int
    lr: float
    tokenizer_files: dict[str, bytes]
    """The tokenizer directory's files, shipped by value so workers on any node can load it."""
    init_checkpoint: Any = None
    """``ray.train.Checkpoint`` of the previous stage, or for stage 0 the run's starting model
    (``model.init_from``, prepared with its ``model/``); ``None``: a fresh model of ``model.*``."""
    schedule: tuple[int, int] | None = None
    """``(offset, total)``: this stage follows one LR schedule of ``total`` steps from step ``offset``
    (``train.lr_scope: run``); ``None``: its own schedule over ``steps``."""
    teacher_dirs: dict[int, str] = field(default_factory=dict)
    """KI teachers' HF model dirs by domain id (-1: every domain), resolved and checked on the driver."""
    replay_uris: list[str] = field(default_factory=list)
    """Memories of earlier domains replayed into this stage (continual.replay.ratio of every micro-batch)."""
    continues: bool = False
    """The stage starts from the model the stage before it left in the same worker group (handed over in
    memory; ``init_checkpoint`` is then ``None``)."""
    segment: int | None = None
    """Population-based training: this run is segment ``segment`` of the stage (its own Ray Train run)."""
    resume_from: Any = None
    """A segment's start: the checkpoint it continues as if it were its own (step, optimizer, data
    position), from this trial or from the trial PBT cloned; the LR comes from this spec's ``lr``."""
    stop_at: int | None = None
    """A segment's end step; the LR and KI schedules still span ``steps``."""
    trial: str | None = None
    """The sweep trial this stage trains for: its console lines carry it, as several trials print at once."""

    @property
    def end(self) -> int:
        return self.stop_at or self.steps

    @property
    def domain_cfg(self):
        return self.cfg.data.domains[self.index]

    @property
    def grow(self):
        """The growth this stage applies to ``init_checkpoint`` (``None``: none)."""
        return self.domain_cfg.grow if self.has_previous else None

    @property
    def has_previous(self) -> bool:
        """The stage continues a model (a stage before, or the run's starting checkpoint)."""
        return self.continues or self.init_checkpoint is not None

    @property
    def frw_steps(self) -> int:
        """ELLE's function-recovering warmup: after this stage's growth, this many steps on the earlier
        domains'
        memory (``replay_uris``; no teacher, its own LR warmup then a constant LR) before the domain, in the
        same
        Ray Train run. The pipeline's rule (:func:`frw_steps_before`), which the FLOP plan follows too."""
        return frw_steps_before(self.cfg, self.index) if self.grow is not None else 0

    @property
    def frw_lr(self) -> float:
        """Peak LR of the warmup (``continual.frw.lr``, else the stage's)."""
        return self.cfg.continual.frw.lr or self.lr

    @property
    def teacher(self):
        """The stage's KI teacher config (the domain phase's, not the warmup's)."""
        return self.domain_cfg.teacher

    @property
    def ki_steps(self) -> int:
        """Steps over which the KI teacher's weight decays (0: no teacher)."""
        return ki_steps(self.teacher, self.steps)

    @property
    def kd_previous(self) -> bool:
        """Logit-KD baseline: the previous stage's model distils on the replayed rows."""
        return (
            self.cfg.continual.logit_kd.weight > 0
            and bool(self.replay_uris)
            and self.has_previous
        )

    @property
    def label(self) -> str:
        base = f"{self.index:02d}-{self.domain}"  # StagePlan.label
        return base + ("" if self.segment is None else f"-seg{self.segment}")

    def console(self, label: str | None = None) -> str:
        """``label`` (default: the stage's) as the console names it: behind the trial's id in a sweep."""
        label = label or self.label
        return f"{self.trial}/{label}" if self.trial else label

    @property
    def frw_label(self) -> str:
        """The warmup's label in the logs (and the stage of its own an earlier version ran it as)."""
        return f"{self.index:02d}-{self.domain}-frw"

    def grad_accum(self, world_size: int) -> int:
        per_step = self.cfg.train.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(
                f"batch size {self.batch_size} is not a multiple of micro_batch_size x workers = {per_step}"
            )
        return self.batch_size // per_step


@dataclass
class StageResult:
    """The driver-side record of a finished stage (also written as ``stage.json``)."""

    index: int
    domain: str
    checkpoint_path: str
    ppl: dict[str, float]
    steps: int
    tokens: int
    train_flops: float
    wall_time_s: float
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    data_wait_s: float = 0.0
    bad_records: dict = field(default_factory=dict)
    restarts: int = 0
    model_sizes: dict = field(default_factory=dict)
    growth: dict | None = None
    teacher_flops: float = 0.0
    teacher_s: float = 0.0
    phase: str = "main"
    replayed_sequences: int = 0
    nodes: list[str] = field(default_factory=list)
    """Ray node id of each worker rank."""
    timings: dict = field(default_factory=dict)
    """Where the phase's wall time went (seconds): ``first_batch_s`` (worker start to first micro-batch),
    ``compute_s``, ``data_wait_s``, ``eval_s``, ``checkpoint_s``; for the run's last phase also ``start_s``
    (``fit()`` called to the workers' loop) and ``end_s`` (loop returned to ``fit()`` returned)."""
    frw: "StageResult | None" = None
    """The function-recovering warmup that ran first in this stage's Ray Train run (``phase="frw"``; its
    ``checkpoint_path`` is empty: the model after it is where the domain phase starts, not kept apart)."""
    initial_ppl: dict[str, float] | None = None
    """Stage 0 of a run from ``model.init_from``: the checkpoint's perplexity on every domain before
    training."""


def read_tokenizer_files(path: str | os.PathLike) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.is_file()}


def materialize_tokenizer(files: dict[str, bytes]) -> str:
    """Write shipped tokenizer files to a per-content temp dir (idempotent); return the dir."""
    digest = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"ray_lifelong_tok_{digest}"
    if not (out / ".complete").exists():
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
        (out / ".complete").touch()
    return str(out)
