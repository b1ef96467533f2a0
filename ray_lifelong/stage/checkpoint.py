"""A stage checkpoint is a self-describing directory:

    model/            HF ``save_pretrained`` weights + config + tokenizer (loads with AutoModelFor...)
    train_state.pt    optimizer and LR-scheduler state
    state.json        step, data position (epoch, micro-batches consumed), tokens, loss history
    config.yaml       the resolved run config
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ray_lifelong.config.load import save_config
from ray_lifelong.data.sources import join_uri


@dataclass
class TrainState:
    """Counters a resumed stage continues from. Ray Data restarts an epoch from its beginning after
    a restore, so the data position is kept here and the consumed micro-batches are skipped."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0
    eval_s: float = 0.0
    """Seconds spent evaluating (every domain's validation rows)."""
    checkpoint_s: float = 0.0
    """Seconds spent in reports: counts synced, checkpoint written and handed to Ray Train."""
    first_batch_s: float | None = None
    """Seconds from the worker's start to the phase's first micro-batch (the first run of it: a restart
    keeps the first value)."""
    restarts: int = 0
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    growth: dict | None = None
    """The growth event at the start of this stage (sizes, params, logit error, seconds), if any."""
    teacher_s: float = 0.0
    teacher_sequences: dict = field(default_factory=dict)
    """Sequences each teacher ran on (key: domain id, "-1" for the shared teacher), for its FLOPs."""
    replayed: int = 0
    """Sequences drawn from the replay memory (they replaced rows of the new domain)."""
    kd_flops: float = 0.0
    """Forward FLOPs of the previous model distilling on replayed rows (logit-KD baseline)."""
    phase: str = "main"
    """``frw``: the stage is in its function-recovering warmup (counters above are the warmup's);
    ``main``: training on the domain."""
    frw: dict | None = None
    """The finished warmup of this stage: its counters (this class's fields), ``ppl`` and ``wall_s``."""
    stage: int | None = None
    """The stage these counters belong to (a Ray Train run may train several stages in turn)."""
    done: bool = False
    """The stage has finished: this is its final checkpoint (the next stage starts from it)."""
    initial_ppl: dict | None = None
    """Stage 0 of a run from ``model.init_from``: the checkpoint's validation perplexity on every domain,
    measured before the first step (kept here so that a restarted stage does not measure a trained model)."""


def save_checkpoint(directory: str | Path, *, model, tokenizer, optimizer, scheduler, state: TrainState,
                    cfg) -> None:
    d = Path(directory)
    model.save_pretrained(d / "model")
    tokenizer.save_pretrained(str(d / "model"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, d / "train_state.pt"
    )
    (d / "state.json").write_text(json.dumps(asdict(state)))
    save_config(cfg, d / "config.yaml")


def load_state(directory: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(directory) / "state.json").read_text()))


def load_optimizer_state(directory: str | Path, optimizer, scheduler) -> None:
    blob = torch.load(Path(directory) / "train_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])


def checkpoint_uri(path: str, filesystem, storage_path: str) -> str:
    """A stage checkpoint as a string that ``ray.train.Checkpoint(...)`` resolves again on any node.

    Ray Train gives a checkpoint as (filesystem, path with the scheme stripped): on S3/GCS the bare path
    would later be read as a local directory. Rebuild the URI from the run's ``storage_path``, keeping its
    ``?query`` (endpoint_override, scheme, region) so that the same store is reached again.
    """
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem) or "://" not in storage_path:
        return path

    _, root = pafs.FileSystem.from_uri(storage_path)
    root = root.rstrip("/")
    if not path.startswith(root + "/"):
        raise ValueError(f"checkpoint {path!r} is not under the storage path {storage_path!r}")
    return join_uri(storage_path, path[len(root) :])
