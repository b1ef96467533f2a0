"""The per-worker training loop (runs inside Ray Train workers): :func:`train_stages` takes the stages of one
Ray Train run in turn, each stage one :func:`_run_stage`.

Read a stage top to bottom: [1] model and state (resume > previous stage > fresh, grown where the stage
grows), [2] DDP, [3] data shard and replay memory, [4a] ELLE's function-recovering warmup on the memory where
the stage has one, [4b] the domain; each phase is the step loop ``_train`` (accumulate, clip, step, log,
evaluate, checkpoint) with its own optimizer; [5] final evaluation and report. Ray touch-points are marked
with ``# [ray]``.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import math
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
from torch import distributed as dist

from ray_lifelong.config.plan import stage_plans
from ray_lifelong.data.memory import (
    memory_epoch,
    memory_failure,
    read_marker,
    read_memories,
    replay_count,
    replay_draw,
)
from ray_lifelong.data.sources import DataError
from ray_lifelong.data.stream import ValidationRows
from ray_lifelong.data.tokenizer import load_tokenizer
from ray_lifelong.distill import inheritance_rate, teacher_needed
from ray_lifelong.distill.teacher import frozen, load_teacher, teacher_logits
from ray_lifelong.eval.metrics import perplexity
from ray_lifelong.flops import sequence_flops
from ray_lifelong.growth import model_sizes
from ray_lifelong.models.build import LMObjective, build_model, lm_loss, load_model, position_rows
from ray_lifelong.stage.checkpoint import (
    TrainState,
    load_optimizer_state,
    load_state,
    save_checkpoint,
)
from ray_lifelong.stage.grow import OldEntries, grow_model
from ray_lifelong.stage.schedule import lr_multiplier
from ray_lifelong.stage.spec import StageSpec, materialize_tokenizer
from ray_lifelong.stage.step import Masker, build_optimizer, maybe_no_sync, stage_loss


def train_stages(config: dict) -> dict:
    """The worker loop of one Ray Train run: the consecutive stages ``config["specs"]`` in order, each
    starting from the model the one before it left in memory (the first from its ``init_checkpoint``).

    After a restart (a worker or node lost, a driver resumed), Ray Train's latest checkpoint says where the
    run was: a stage's own checkpoint resumes that stage; a stage's final checkpoint starts the next one from
    it (and is reported again when the driver has no record of it, ``config["recorded"]``).
    """
    specs: list[StageSpec] = config["specs"]
    valid: ValidationRows = config["valid"]
    cfg = specs[0].cfg
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    _quiet_transformers()
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    tokenizer = load_tokenizer(materialize_tokenizer(specs[0].tokenizer_files))
    begin, resume, handoff, stream = 0, None, None, None
    restored = ray.train.get_checkpoint()  # [ray]
    if restored is not None:
        with restored.as_directory() as d:
            rstate = load_state(d)
        at = specs[0].index if rstate.stage is None else rstate.stage  # a checkpoint of before stages ran
        if at >= specs[0].index:
            pos = at - specs[0].index
            if not rstate.done:
                begin, resume = pos, restored
            else:  # the stage had finished: the next one starts from its final checkpoint
                begin, handoff = pos + 1, _Handoff(checkpoint=restored)
                if at > config["recorded"]:
                    _report_again(specs[pos], restored, rstate)
    if begin < len(specs):
        # the stream's cold start (its coordinator and tokenizer actors) overlaps the model's build
        stream = _Stream(specs[begin])
        stream.start_early()
    out = {}
    for pos in range(begin, len(specs)):
        following = specs[pos + 1] if pos + 1 < len(specs) else None
        out, handoff, stream = _run_stage(specs[pos], valid, tokenizer, resume, handoff, stream, following)
        resume = None
    return out


def _run_stage(spec: StageSpec, valid: ValidationRows, tokenizer, resume, handoff: "_Handoff | None",
               stream: "_Stream | None", next_spec: StageSpec | None) -> tuple[dict, "_Handoff", "_Stream"]:
    """One stage on this worker: [1] model, [2] DDP, [3] data, [4a] warmup, [4b] domain, [5] final
    evaluation and report. ``stream``: this stage's stream when the stage before started it. Returns the
    stage's record (as reported), the model the next stage starts from and the next stage's stream."""
    cfg, t = spec.cfg, spec.cfg.train
    started = time.perf_counter()
    entered = time.time()  # wall clock: the driver measures the worker group's start against it
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # [ray]
    torch.manual_seed(t.seed + 1000 * spec.index + rank)

    # [1] model and state: a retry of this stage > the previous stage's model > a fresh model
    start = _initial_model(spec, tokenizer, device, valid, resume, handoff)
    del handoff
    model, state, previous = start.model, start.state, start.previous
    # from_pretrained gives a model in eval mode: without this, dropout would stay off in every stage that
    # continues a checkpoint (a later domain, a restart, a PBT segment) until its first evaluation
    model.train()

    # [2] DDP
    # [ray] moves to device, wraps DDP if world > 1
    objective = ray.train.torch.prepare_model(LMObjective(model))
    inner: LMObjective = objective.module if hasattr(objective, "module") else objective
    ddp = objective
    if t.compile:  # compiled around DDP: TorchDynamo splits the graph at DDP's gradient buckets
        # the objective keeps the supervised positions only (a count that changes every batch): traced as a
        # size of its own, not a graph break whose second half is compiled twice (one size, then any size)
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        objective = torch.compile(objective)

    # [3] data: this worker's share of the domain stream, the (unsplit) replay memories and validation sets
    stream = stream or _Stream(spec)
    following = stream.then = _Stream(next_spec) if next_spec is not None else None
    # a memory written while the stage before trained may still be on its way (the driver writes it)
    memory = read_memories(wait_for_memories(spec.replay_uris)) if spec.replay_uris else None
    if state.phase == "frw" and memory is None:
        raise ValueError(
            f"stage {spec.label}: a function-recovering warmup needs the earlier domains' "
            f"memory (replay_uris)"
        )
    w = _Worker(
        spec=spec,
        rank=rank,
        world=world,
        device=device,
        objective=objective,
        ddp=ddp,
        inner=inner,
        masker=Masker(tokenizer, cfg.data.mlm_probability, cfg.model.arch),
        tokenizer=tokenizer,
        use_bf16=t.bf16 and device.type == "cuda",
        accum=spec.grad_accum(world),
        memory=memory,
        previous=previous,
        previous_fwd=_forward_flops(previous.model, cfg) if previous else 0.0,
        synced=_counts(state),
        entered=entered,
        valid=valid,
        old=start.old,
    )
    if state.growth and state.step == 0:
        g = state.growth
        w.say(
            spec.label,
            f"grew {g['before']} -> {g['after']} ({g['params_before']:,} -> {g['params_after']:,} "
            f"params, max logit error {g['max_logit_error']:.2e}, optimizer {g['optimizer']}, "
            f"{g['expand_seconds']:.2f}s)"
            + (f"; training only what it added ({g['trainable_params']:,} params)" if start.old else ""),
        )

    # [4a] ELLE's function-recovering warmup, after the growth: only the memory, its own short LR warmup
    if state.phase == "frw":
        optimizer, scheduler = _phase_optimizer(w, "frw", start)
        w.say(
            spec.frw_label,
            f"start at step {state.step}/{spec.frw_steps} on the memory of "
            f"{len(memory[0])} domains ({sum(len(m) for m in memory[0])} sequences), "
            f"restarts={state.restarts}",
        )
        _train(
            w,
            state,
            optimizer,
            scheduler,
            end=spec.frw_steps,
            label=spec.frw_label,
            teachers={},
            batches=lambda epoch: memory_epoch(
                memory,
                seed=hash((t.seed, spec.index, epoch)) % (2**62),
                rank=rank,
                world=world,
                batch_size=t.micro_batch_size,
            ),
        )
        ppl = _evaluate_into(w, state)
        _sync_counts(w, state)  # the warmup's record holds every rank's counts
        done = {k: v for k, v in state.__dict__.items() if k != "frw"}
        state = TrainState(
            phase="main",
            frw=dict(done, ppl=ppl, wall_s=time.perf_counter() - started),
            restarts=state.restarts,
        )
        w.synced = _counts(state)
        torch.manual_seed(t.seed + 1000 * spec.index + rank)  # the domain's phase as if it were its own run
        optimizer, scheduler = _phase_optimizer(w, "main")  # a fresh optimizer and LR schedule, as in ELLE
        # the grown, recovered model and the domain phase's start: a restart from here begins the domain
        _report(w, state, None, optimizer, scheduler)
    else:
        optimizer, scheduler = _phase_optimizer(w, "main", start)

    # [4b] the domain (with replay, KI teachers or logit KD where configured)
    rp, kd = cfg.continual.replay, cfg.continual.logit_kd
    stream.left = (spec.end - state.step) * w.accum
    w.say(
        spec.label,
        f"stage {spec.index + 1} of {len(cfg.data.domains)}: start at step {state.step}/{spec.end}, "
        f"{_sizes_text(inner.model)} (workers={world}, accumulation={w.accum}, restarts={state.restarts})",
    )
    if memory is not None:
        w.say(
            spec.label,
            f"replaying {rp.ratio:.0%} of each batch from {len(memory[0])} memories "
            f"({sum(len(m) for m in memory[0])} sequences)"
            + (f", logit KD weight {kd.weight}" if spec.kd_previous else ""),
        )
    _train(
        w,
        state,
        optimizer,
        scheduler,
        end=spec.end,
        label=spec.label,
        teachers=_load_teachers(spec, state, w),
        mix=memory is not None,
        batches=stream.epoch,
    )

    # [5] final evaluation on every domain, final checkpoint (the stage's record rides on its report)
    ppl = _evaluate_into(w, state)
    state.done = True
    record = {"entered": entered, "ppl": ppl, "sizes": model_sizes(inner.model),
              "vocab": inner.model.config.vocab_size, "nodes": _worker_nodes(world)}
    out = _report(w, state, ppl, optimizer, scheduler, record=record)
    if w.old is not None:  # the next stage trains every parameter again
        w.old.release()
    carry = next_spec is not None and next_spec.grow is not None and next_spec.grow.optimizer == "carry"
    # the next stage continues this model (moved off the device before it builds its own) and, where its
    # growth carries AdamW's moments, this optimizer's state
    return out, _Handoff(model=inner.model.to("cpu"),
                         optimizer=_to_cpu(optimizer.state_dict()) if carry else None), following


ADDED = "added.pt"
"""In a checkpoint of a stage that trains only what its growth added: the masks of the added entries."""

NEXT_STREAM_LEAD_S = 30.0
"""How long before a stage's end, at its pace so far, the next stage's stream starts: its cold start (a
coordinator and a tokenizer actor, then its first rows) takes seconds, and started much earlier it would
hold buffered rows and a tokenizer's CPU through the whole stage."""


class _Stream:
    """A stage's share of its training stream, epoch by epoch.

    - Its first epoch can start early, in a thread, while the stage before still trains (the stage then
      finds its first batches waiting); it starts the next stage's stream in turn once the stage has less
      than ``NEXT_STREAM_LEAD_S`` left at its pace so far, half of it has trained, or its stream has been
      read whole.
    - Its first epoch's batches are kept (``data.epoch_cache_mb``) and later epochs replay them: in stream
      order (no shuffle buffer) every epoch is the same, and the domain is not streamed again. A restarted
      stage in a later epoch reads the first one back first.
    """

    def __init__(self, spec: StageSpec, shard=None):
        self.shard = shard or ray.train.get_dataset_shard(train_dataset_name(spec.index))  # [ray]
        self.data, self.train = spec.cfg.data, spec.cfg.train
        self.early: tuple[threading.Thread, dict] | None = None
        self.cache: list | None = [] if self.data.epoch_cache_mb and not self.data.shuffle_buffer else None
        self.cached_bytes = 0
        self.complete = False
        self.then: _Stream | None = None
        self.left = 0
        """The batches this stage still reads (set as its domain phase starts); they time ``then``'s start."""
        self.read = 0
        self.first_read_at = 0.0

    def _stream(self, epoch: int):
        return self.shard.iter_torch_batches(  # [ray] streams while we train
            batch_size=self.train.micro_batch_size,
            drop_last=True,
            dtypes=torch.long,
            local_shuffle_buffer_size=self.data.shuffle_buffer or None,
            local_shuffle_seed=(self.train.seed + epoch) if self.data.shuffle_buffer else None,
        )

    def start_early(self) -> None:
        """Start the first epoch now and hold its first batch."""
        if self.early is not None or self.complete:
            return
        held: dict = {}

        def fetch() -> None:
            try:
                it = iter(self._stream(0))
                held["first"], held["rest"] = next(it, None), it
            except BaseException as e:  # raised where the stage asks for its batches
                held["error"] = e

        thread = threading.Thread(target=fetch, name="early-stream", daemon=True)
        thread.start()
        self.early = (thread, held)

    def _first_epoch(self):
        if self.early is None:
            yield from self._stream(0)
            return
        (thread, held), self.early = self.early, None
        thread.join()
        if "error" in held:
            raise held["error"]
        if held["first"] is not None:
            yield held["first"]
            yield from held["rest"]

    def _kept(self, epoch_zero):
        """Yield ``epoch_zero``'s batches, keeping them while they fit."""
        cap = self.data.epoch_cache_mb * 2**20
        if self.cache is not None:  # (an earlier read of it was cut short)
            self.cache, self.cached_bytes = [], 0
        for batch in epoch_zero:
            if self.cache is not None:
                self.cached_bytes += sum(v.numel() * v.element_size() for v in batch.values())
                if self.cached_bytes > cap:
                    self.cache = None
                else:
                    self.cache.append(batch)
            yield batch
        self.complete = self.cache is not None

    def _next_due(self) -> bool:
        """Whether the next stage's stream should start now (called as each batch is handed out)."""
        self.read += 1
        now = time.perf_counter()
        if self.read == 1:
            self.first_read_at = now
            return False
        pace = (now - self.first_read_at) / (self.read - 1)
        return self.read >= self.left // 2 or (self.left - self.read) * pace <= NEXT_STREAM_LEAD_S

    def epoch(self, epoch: int):
        """The batches of ``epoch``."""
        if epoch > 0 and not self.complete and self.cache is not None:
            for _ in self._kept(self._first_epoch()):  # a restart in a later epoch: read the first back
                pass
        if epoch > 0 and self.complete:
            batches = iter(self.cache)
        else:
            batches = self._kept(self._first_epoch()) if epoch == 0 else self._stream(epoch)
        for batch in batches:
            if self.then is not None and self._next_due():
                self.then.start_early()
            yield batch
        if self.then is not None:  # this stage's stream has been read whole
            self.then.start_early()


@dataclass
class _Handoff:
    """What a stage starts from when the stage before it ran in the same worker group: that stage's model
    and optimizer state in memory, or (after a restart) its final checkpoint."""

    model: torch.nn.Module | None = None
    optimizer: dict | None = None
    checkpoint: ray.train.Checkpoint | None = None


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def train_dataset_name(index: int) -> str:
    """The Ray Train dataset of stage ``index`` (a run's stages each stream their own)."""
    return f"train_{index}"


def wait_for_memories(uris: list[str], poll_s: float = 0.2) -> list[str]:
    """Return ``uris`` once every memory is complete; raise the driver's error for one it failed to write
    (:func:`ray_lifelong.data.memory.write_failure`)."""
    while True:
        for uri in uris:
            failed = memory_failure(uri)
            if failed:
                raise DataError(failed)
        if all(read_marker(u) is not None for u in uris):
            return uris
        time.sleep(poll_s)


@dataclass
class _Start:
    """Where a stage's worker begins: its model, its counters, and the state its optimizer resumes from."""

    model: torch.nn.Module
    state: TrainState
    own: bool = False
    """Resumed from this stage's own checkpoint (a retry), not from a PBT segment it continues."""
    optimizer_dir: str | None = None
    """A local copy of the checkpoint's optimizer and schedule (``train_state.pt``), when resuming."""
    carried: dict | None = None
    """AdamW state mapped onto the grown parameters (``grow.optimizer=carry``)."""
    previous: LMObjective | None = None
    """Logit-KD baseline: the previous stage's model, frozen."""
    old: OldEntries | None = None
    """``grow.train: new``: what keeps the entries the growth did not add."""


def _initial_model(spec: StageSpec, tokenizer, device, valid: ValidationRows, resume, handoff) -> _Start:
    """The model a worker trains, in this order: a retry of the stage resumes its last checkpoint
    (``resume``; or a PBT segment the checkpoint it continues); else the previous stage's model (``handoff``
    when it ran in this worker group, else ``spec.init_checkpoint``), grown where the stage grows (the same
    seed on every rank, so every rank grows the same model), or for stage 0 the checkpoint of
    ``model.init_from`` (prepared on the driver), whose perplexity on every domain is measured first; else a
    fresh model of ``model.*``."""
    cfg, t = spec.cfg, spec.cfg.train
    own = resume is not None
    if resume is None:
        resume = spec.resume_from
    start = _Start(model=None, state=TrainState(phase="frw" if spec.frw_steps else "main"), own=own)
    if handoff is not None and handoff.checkpoint is not None:
        handoff = _Handoff(*_read_handoff(handoff.checkpoint, cfg.model.arch))
    if resume is not None:
        with resume.as_directory() as d:
            start.model = load_model(str(Path(d) / "model"), cfg.model.arch)
            start.state = load_state(d)
            start.state.restarts += int(own)
            start.optimizer_dir = tempfile.mkdtemp()
            Path(start.optimizer_dir, "train_state.pt").write_bytes(Path(d, "train_state.pt").read_bytes())
            if Path(d, ADDED).exists():  # grow.train=new: the stage trains only what its growth added
                start.old = OldEntries(start.model, torch.load(Path(d, ADDED), weights_only=True))
    elif handoff is not None or spec.init_checkpoint is not None:
        if handoff is None:
            handoff = _Handoff(*_read_handoff(spec.init_checkpoint, cfg.model.arch, spec.grow))
        start.model = handoff.model
        grow = spec.grow
        if grow is not None:
            start.model, start.carried, start.state.growth, start.old = grow_model(
                start.model, grow, seed=t.seed + spec.index, train=t,
                lr=spec.frw_lr if spec.frw_steps else spec.lr, optimizer_state=handoff.optimizer,
                build_optimizer=build_optimizer)
        if spec.index == 0 and cfg.model.init_from:  # a retry resumes with the state that holds it
            start.state.initial_ppl = _initial_ppl(spec, start.model, tokenizer, device, valid)
    else:
        start.model = build_model(cfg.model, len(tokenizer), pad_id=tokenizer.pad_token_id,
                                  eos_id=tokenizer.eos_token_id, seed=t.seed)
    rows = start.model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {rows}")
    if spec.kd_previous:  # the previous stage's model, also when a retry resumes the stage
        if handoff is None or handoff.model is None:  # a retry: the previous stage's final checkpoint
            handoff = _Handoff(*_read_handoff(spec.init_checkpoint or _final_checkpoint(spec.index - 1),
                                              cfg.model.arch))
        start.previous = LMObjective(frozen(copy.deepcopy(handoff.model), device, t.bf16))
    return start


def _read_handoff(ckpt, arch: str, grow=None) -> tuple:
    """``(model, optimizer state or None)`` of a checkpoint, as :class:`_Handoff` holds them (the optimizer
    state only where a growth carries it)."""
    with ckpt.as_directory() as d:
        model = load_model(str(Path(d) / "model"), arch)
        opt = None
        if grow is not None and grow.optimizer == "carry":
            opt = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False)["optimizer"]
    return model, opt


def _final_checkpoint(index: int) -> ray.train.Checkpoint:
    """The final checkpoint of stage ``index`` of this Ray Train run (a retry's way back to the model the
    stage before left)."""
    storage = ray.train.get_context().get_storage()  # [ray]
    fs, root = storage.storage_filesystem, storage.experiment_fs_path
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/state.json") as f:
                st = json.loads(f.read())
        except (FileNotFoundError, OSError):
            continue
        if st.get("stage") == index and st.get("done"):
            return ray.train.Checkpoint(info.path, filesystem=fs)
    raise FileNotFoundError(f"no final checkpoint of stage {index} under {root}")


def _initial_ppl(spec: StageSpec, model, tokenizer, device, valid: ValidationRows) -> dict:
    """The perplexity of ``model`` on every domain's validation rows, before any training: the row above
    stage 0 in the run's matrix (every rank takes part, as in every evaluation)."""
    ctx = ray.train.get_context()  # [ray]
    masker = Masker(tokenizer, spec.cfg.data.mlm_probability, spec.cfg.model.arch)
    ppl = _evaluate(LMObjective(model.to(device)), spec, valid, masker, device, ctx.get_world_rank(),
                    ctx.get_world_size())
    if ctx.get_world_rank() == 0:
        print(f"[stage {spec.console()}] model.init_from before training: "
              + ", ".join(f"{d} ppl {p:.2f}" for d, p in ppl.items()), flush=True)
    return ppl


@dataclass
class _Worker:
    """What every phase of a stage's step loop shares on one worker."""

    spec: StageSpec
    rank: int
    world: int
    device: torch.device
    objective: torch.nn.Module
    """What the step calls: DDP-wrapped and/or compiled."""
    ddp: torch.nn.Module
    """The DDP wrapper (or the objective itself on one worker), for ``no_sync``."""
    inner: LMObjective
    masker: Masker
    tokenizer: object
    use_bf16: bool
    accum: int
    memory: tuple | None
    """The replay memories (:func:`_load_memory`), or ``None``."""
    previous: LMObjective | None
    """Logit-KD baseline: the previous stage's frozen model."""
    previous_fwd: float
    synced: dict
    """The counts of :func:`_counts` at the last report, summed over the ranks (see :func:`_sync_counts`)."""
    entered: float
    """``time.time()`` when the worker's loop began."""
    valid: ValidationRows
    """Every domain's validation rows."""
    old: OldEntries | None = None
    """``grow.train: new``: the stage trains only the entries its growth added."""

    phase_start: tuple[float, int] = (0.0, 0)
    """When the running phase's step loop began, and at which step (its ETA's rate)."""

    def say(self, label: str, text: str) -> None:
        if self.rank == 0:
            print(f"[stage {self.spec.console(label)}] {text}", flush=True)

    @functools.cached_property
    def later_stages_steps(self) -> int:
        """Optimizer steps of the stages after this one, their warmups included (planned once)."""
        return sum(p.steps + p.frw_steps for p in stage_plans(self.spec.cfg)[self.spec.index + 1:])

    def steps_after_phase(self, label: str) -> int:
        """Optimizer steps the run has left after the phase ``label`` (the domain after its warmup, the
        later stages with theirs): the run's ETA at the running phase's rate, stage starts left out."""
        return self.later_stages_steps + (self.spec.steps if label == self.spec.frw_label else 0)


def _phase_optimizer(w: _Worker, phase: str, start: _Start | None = None):
    """AdamW and the LR schedule of a phase: the warmup's own short linear warmup to its peak LR, held until
    the phase ends; the domain's warmup and decay over its steps (or its share of the run's schedule).

    ``start``: where the phase's state comes from: AdamW moments carried through a growth
    (``grow.optimizer=carry``), then a checkpoint's optimizer and schedule when the stage resumes (a PBT
    segment keeps its own LR, which PBT may have perturbed, on the restored schedule). ``None``: fresh.
    """
    spec, t = w.spec, w.spec.cfg.train
    if phase == "frw":
        lr, offset, total = spec.frw_lr, 0, spec.frw_steps
        warmup, decay = spec.cfg.continual.frw.warmup_steps, "constant"
    else:
        lr, (offset, total) = spec.lr, spec.schedule or (0, spec.steps)
        warmup, decay = int(t.warmup_ratio * total), t.lr_decay
    optimizer = build_optimizer(w.inner.model, lr, t)
    if w.old is not None:
        w.old.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        offset + s, total, warmup=warmup, decay=decay, min_ratio=t.min_lr_ratio))
    if start is None:
        return optimizer, scheduler
    if start.carried is not None:  # AdamW moments mapped onto the grown parameters
        optimizer.load_state_dict(start.carried)
    if start.optimizer_dir is not None:
        load_optimizer_state(start.optimizer_dir, optimizer, scheduler)
        if phase == "main" and not start.own:
            scheduler.base_lrs = [spec.lr] * len(optimizer.param_groups)
            for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
                group["initial_lr"], group["lr"] = spec.lr, spec.lr * fn(scheduler.last_epoch)
    return optimizer, scheduler


def _load_teachers(spec: StageSpec, state: TrainState, w: _Worker) -> dict:
    """The stage's KI teachers by domain id: frozen, never DDP-wrapped, not loaded once inheritance is
    over."""
    ki = spec.teacher
    if not ki or not teacher_needed(state.step, schedule=ki.schedule, steps=spec.ki_steps, alpha0=ki.alpha0):
        return {}
    loaded: dict = {}  # a teacher shared by several domains is loaded once
    for path in spec.teacher_dirs.values():
        if path not in loaded:
            loaded[path] = load_teacher(path, w.device, spec.cfg.train.bf16)
    return {domain_id: loaded[path] for domain_id, path in spec.teacher_dirs.items()}


def _train(
    w: _Worker,
    state: TrainState,
    optimizer,
    scheduler,
    *,
    end: int,
    label: str,
    teachers: dict,
    batches,
    mix: bool = False,
) -> None:
    """The step loop of one phase, up to step ``end``: accumulate, clip, step, log, evaluate, checkpoint.

    ``batches(epoch)``: one epoch of this worker's micro-batches; ``mix``: replace a share of every
    micro-batch
    with replayed memory rows; ``teachers``: KI teachers (emptied, and freed, once inheritance is over).
    """
    spec, cfg, t, device = w.spec, w.spec.cfg, w.spec.cfg.train, w.device
    ki = spec.teacher if teachers else None
    ki_steps = spec.ki_steps
    rp, kd = cfg.continual.replay, cfg.continual.logit_kd
    seq_tokens = spec.batch_size * cfg.data.seq_len
    micro, loss_acc, ce_acc, kl_acc, alpha = 0, 0.0, 0.0, 0.0, 0.0
    since = (time.perf_counter(), state.tokens)  # the last log line's time and token count
    w.phase_start = (time.perf_counter(), state.step)
    while state.step < end:
        seen = 0
        wait0 = time.perf_counter()
        for batch in batches(state.epoch):
            seen += 1
            if seen <= state.batches_in_epoch:  # consumed before a restart: skip, don't train twice
                wait0 = time.perf_counter()
                continue
            c0 = time.perf_counter()
            state.data_wait_s += c0 - wait0
            if state.first_batch_s is None:
                state.first_batch_s = time.time() - w.entered
            gen = torch.Generator().manual_seed(
                hash((t.seed, spec.index, w.rank, state.step, micro)) % (2**62)
            )
            ids, domain_ids, k = batch["input_ids"], batch["domain_id"], 0
            if mix:  # the last k rows are replaced by rows of earlier domains' memories
                ids, domain_ids, k = _mix_replay(ids, domain_ids, w.memory, rp, gen)
                state.replayed += k
            inputs, labels = w.masker(ids.to(device), gen)
            sync = micro == w.accum - 1
            alpha = (
                inheritance_rate(state.step, schedule=ki.schedule, steps=ki_steps, alpha0=ki.alpha0)
                if teachers
                else 0.0
            )
            with maybe_no_sync(w.ddp, sync), torch.autocast(device.type, torch.bfloat16, enabled=w.use_bf16):
                logits, targets = w.objective(inputs, labels)
                t_logits = p_logits = rows = None
                if alpha > 0:  # the teacher sees exactly the student's batch (same masking)
                    t_logits = _teacher_forward(w, state, teachers, inputs, labels, domain_ids, len(targets))
                elif w.previous is not None and k > 0:  # logit KD on the replayed rows only
                    rows, p_logits = _previous_forward(w, state, inputs, labels, len(ids), k)
                loss, ce, kl = stage_loss(
                    logits, targets, alpha=alpha, teacher_logits=t_logits,
                    temperature=ki.temperature if ki else 1.0, top_k=ki.top_k if ki else None,
                    previous_logits=p_logits, previous_rows=rows, kd_weight=kd.weight,
                    kd_temperature=kd.temperature)
            (loss / w.accum).backward()
            # accumulate on the device: a float() here would synchronise the GPU every micro-step
            loss_acc += loss.detach() / w.accum
            ce_acc += ce / w.accum
            kl_acc += kl / w.accum
            state.batches_in_epoch = seen
            micro += 1
            if micro == w.accum:
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(w.inner.parameters(), t.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.tokens += seq_tokens
                micro = 0
                _maybe_crash(spec, state.step, w.rank)
                if cfg.debug.slow_step_s:
                    time.sleep(cfg.debug.slow_step_s)
                if state.step % t.log_every == 0 or state.step == end:
                    note = "ki" if ki else ("kd" if w.previous is not None and mix else "")
                    since = _log_step(w, state, label, end, scheduler, since, alpha=alpha,
                                      loss=float(loss_acc), ce=float(ce_acc), kl=float(kl_acc), note=note)
                loss_acc = ce_acc = kl_acc = 0.0
                if teachers and not teacher_needed(
                    state.step, schedule=ki.schedule, steps=ki_steps, alpha0=ki.alpha0
                ):
                    teachers.clear()  # inheritance is over: free the teacher(s)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                state.compute_s += time.perf_counter() - c0
                if state.step >= end:
                    break
                if t.eval_every and state.step % t.eval_every == 0:
                    _report(w, state, _evaluate_into(w, state), optimizer, scheduler)
                elif state.step % t.checkpoint_every == 0:
                    _report(w, state, None, optimizer, scheduler)
            else:
                state.compute_s += time.perf_counter() - c0
            wait0 = time.perf_counter()
        else:
            if seen == 0:
                raise DataError(
                    f"domain {spec.domain!r}: the training stream yielded no sequence of "
                    f"{cfg.data.seq_len} tokens on worker {w.rank} (empty domain, or fewer "
                    f"tokens than one micro-batch per worker)"
                )
            state.epoch += 1
            state.batches_in_epoch = 0


def _teacher_forward(w: _Worker, state: TrainState, teachers: dict, inputs, labels, domain_ids, count: int):
    """The KI teachers' logits at the student's supervised positions (each row its domain's teacher, or the
    shared one), timed and counted per teacher for the stage's FLOPs."""
    t0 = time.perf_counter()
    logits = teacher_logits(teachers, inputs, labels, domain_ids.to(w.device), count)
    state.teacher_s += time.perf_counter() - t0
    for d in domain_ids.tolist():
        key = str(d if d in teachers else -1)
        state.teacher_sequences[key] = state.teacher_sequences.get(key, 0) + 1
    return logits


def _previous_forward(w: _Worker, state: TrainState, inputs, labels, rows: int, k: int):
    """Logit KD: the previous stage's logits on the last ``k`` (replayed) of ``rows`` rows, and which of the
    student's supervised positions belong to those rows."""
    t0 = time.perf_counter()
    replayed = position_rows(labels, w.inner.arch) >= rows - k
    with torch.no_grad():
        logits = w.previous(inputs[-k:], labels[-k:])[0]
    state.teacher_s += time.perf_counter() - t0
    state.kd_flops += k * w.previous_fwd
    return replayed, logits


def _log_step(w: _Worker, state: TrainState, label: str, end: int, scheduler, since: tuple[float, int], *,
              alpha: float, loss: float, ce: float, kl: float, note: str) -> tuple[float, int]:
    """Record the step in the stage's history and print its line (rank 0); return the new ``since``."""
    now = time.perf_counter()
    tps = (state.tokens - since[1]) / max(now - since[0], 1e-9)
    lr = scheduler.get_last_lr()[0]
    state.history.append({"step": state.step, "loss": loss, "lr": lr, "tokens": state.tokens,
                          "tokens_per_s": tps, "interval_s": now - since[0], "data_wait_s": state.data_wait_s,
                          "compute_s": state.compute_s, "alpha": alpha, "ce": ce, "kl": kl,
                          "teacher_s": state.teacher_s})
    parts = {"ki": f" alpha {alpha:.2f} ce {ce:.3f} kl {kl:.3f}", "kd": f" ce {ce:.3f} kd {kl:.3f}"}
    extra = parts.get(note, "")
    per_step = (now - w.phase_start[0]) / max(1, state.step - w.phase_start[1])
    left = end - state.step
    later = w.steps_after_phase(label)
    eta = f"ETA stage {_clock(left * per_step)}, run ~{_clock((left + later) * per_step)}"
    w.say(label, f"step {state.step}/{end} loss {loss:.4f}{extra} lr {lr:.2e} tok/s {tps:,.0f} {eta}")
    return now, state.tokens


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _sizes_text(model) -> str:
    z = model_sizes(model)
    kv = z.get("num_key_value_heads")
    heads = f"{z['num_attention_heads']} heads"
    if kv and kv != z["num_attention_heads"]:
        heads += f", {kv} KV"
    return f"{z['num_hidden_layers']} layers x {z['hidden_size']} ({heads}, FFN {z['intermediate_size']})"


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (where a stage's placement put its workers)."""
    node = ray.get_runtime_context().get_node_id()  # [ray]
    if world == 1:
        return [node]
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return nodes


def _mix_replay(ids: torch.Tensor, domain_ids: torch.Tensor, memory, rp, gen: torch.Generator):
    """Replace the last k rows of a micro-batch with rows drawn from the memories (k ~ ratio * rows)."""
    pools, pool_domains = memory
    k = replay_count(len(ids), rp.ratio, gen)
    if k == 0:
        return ids, domain_ids, 0
    which, rows = replay_draw([len(p) for p in pools], k, gen, rp.weighting)
    ids, domain_ids = ids.clone(), domain_ids.clone()
    ids[-k:] = torch.stack([pools[w][r] for w, r in zip(which.tolist(), rows.tolist())])
    domain_ids[-k:] = torch.tensor([pool_domains[w] for w in which.tolist()], dtype=domain_ids.dtype)
    return ids, domain_ids, k


def _forward_flops(model, cfg) -> float:
    """Forward FLOPs of one sequence through ``model`` (flops.md), for a frozen teacher's cost."""
    return sequence_flops(model_sizes(model), vocab=model.config.vocab_size, seq_len=cfg.data.seq_len,
                          arch=cfg.model.arch, mlm_probability=cfg.data.mlm_probability, train=False)


def _counts(state: TrainState) -> dict:
    return {"replayed": state.replayed, "kd_flops": state.kd_flops, "teacher": dict(state.teacher_sequences)}


def _sync_counts(w: _Worker, state: TrainState) -> None:
    """Replayed rows and teacher forwards are counted on the rank that ran them (its share of each batch).
    At every report the increments since the last one are summed over the ranks, so that every rank holds,
    and rank 0 checkpoints and returns, the whole stage's counts (a restored state is already whole)."""
    if w.world > 1 and dist.is_available() and dist.is_initialized():
        keys = [str(i) for i in range(len(w.spec.cfg.data.domains))] + [
            "-1"
        ]  # teachers by domain id, or shared
        last = w.synced
        delta = torch.tensor(
            [state.replayed - last["replayed"], state.kd_flops - last["kd_flops"]]
            + [state.teacher_sequences.get(k, 0) - last["teacher"].get(k, 0) for k in keys],
            dtype=torch.float64,
            device=w.device,
        )
        dist.all_reduce(delta)
        total = delta.tolist()
        state.replayed = last["replayed"] + round(total[0])
        state.kd_flops = last["kd_flops"] + total[1]
        teacher = {k: last["teacher"].get(k, 0) + round(n) for k, n in zip(keys, total[2:])}
        state.teacher_sequences = {k: n for k, n in teacher.items() if n}
    w.synced = _counts(state)


def _report(w: _Worker, state, ppl, optimizer, scheduler, *, record: dict | None = None) -> dict | None:
    """All workers call ``ray.train.report`` (a barrier); only rank 0 attaches the checkpoint.

    ``record``: the stage is done; its record, with the state's counters, rides on the report (for the
    driver) and is kept beside the checkpoint (``record.json``, from which a restart reports it again).
    Returns the record as reported.
    """
    spec = w.spec
    t0 = time.perf_counter()
    state.stage = spec.index
    _sync_counts(w, state)
    final = record is not None
    metrics = {"stage": spec.index, "step": state.step, "tokens": state.tokens, "final": final,
               "keep": keep_score(spec.index, final)}
    if ppl:
        metrics.update({f"ppl/{k}": v for k, v in ppl.items()})
        metrics["valid_loss"] = math.log(ppl[spec.domain])
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if w.rank == 0:
            save_checkpoint(
                d,
                model=w.inner.model,
                tokenizer=w.tokenizer,
                optimizer=optimizer,
                scheduler=scheduler,
                state=state,
                cfg=spec.cfg,
            )
            if w.old is not None:
                torch.save(w.old.added, Path(d, ADDED))
            if final:
                record = dict(record, reported=time.time())
                Path(d, "record.json").write_text(json.dumps(record))
            ckpt = ray.train.Checkpoint.from_directory(d)
        if final:
            state.checkpoint_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            record = metrics["record"] = dict(record, state=dict(state.__dict__))
            record.setdefault("reported", time.time())  # (rank > 0 wrote no record.json)
        ray.train.report(metrics, checkpoint=ckpt)  # [ray]
    state.checkpoint_s += time.perf_counter() - t0
    return record


def keep_score(index: int, final: bool) -> float:
    """The score Ray Train keeps checkpoints by (``CheckpointConfig.checkpoint_score_attribute``): every
    stage's final checkpoint above every other, which rank by time (the latest is always kept), so that a
    run of several stages keeps each stage's result and its most recent checkpoints."""
    return 1e12 + index if final else time.time()


def _report_again(spec: StageSpec, ckpt: ray.train.Checkpoint, state: TrainState) -> None:
    """Report a finished stage's record again, from its final checkpoint (the driver lost the first report:
    it died between the checkpoint and its record)."""
    with ckpt.as_directory() as d:
        record = json.loads(Path(d, "record.json").read_text())
    state.restarts += 1  # restored from its checkpoint, as a stage resumed there would count it
    record["state"] = dict(state.__dict__)
    ray.train.report({"stage": spec.index, "step": state.step, "tokens": state.tokens, "final": True,  # [ray]
                      "record": record, "checkpoint_path": ckpt.path}, checkpoint=None)


def _evaluate_into(w: _Worker, state: TrainState) -> dict:
    """Evaluate every domain now, record it in ``state.evals`` and its time in ``state.eval_s``."""
    t0 = time.perf_counter()
    ppl = _evaluate(w.inner, w.spec, w.valid, w.masker, w.device, w.rank, w.world)
    state.evals.append({"step": state.step, "tokens": state.tokens, "ppl": ppl})
    state.eval_s += time.perf_counter() - t0
    return ppl


@torch.no_grad()
def _evaluate(inner: LMObjective, spec: StageSpec, valid: ValidationRows, masker: Masker, device, rank: int,
              world: int) -> dict:
    """Perplexity on every domain's validation rows (the first ``eval_max_sequences`` of each).

    Every worker iterates the whole (small) validation set and scores the rows whose
    index is ``rank`` modulo the world size; the sums are all-reduced, so the result does not depend
    on the number of workers.
    """
    inner.eval()
    n = len(spec.eval_domains)
    cap = spec.cfg.data.eval_max_sequences
    totals = torch.zeros(2 * n, dtype=torch.float64, device=device)  # [nll sums..., counts...]
    taken = [0] * n
    row = 0
    for batch in valid.batches(spec.cfg.train.micro_batch_size):
        for d in batch["domain_id"].unique().tolist():
            ids = batch["input_ids"][batch["domain_id"] == d]
            ids = ids[: max(0, cap - taken[d])]
            taken[d] += len(ids)
            mine = (torch.arange(row, row + len(ids)) % world) == rank
            row += len(ids)
            if not mine.any():
                continue
            inputs, labels = masker(ids[mine], None, fixed=True)
            logits, targets = inner(inputs.to(device), labels.to(device))
            totals[d] += lm_loss(logits, targets, reduction="sum").double()
            totals[n + d] += targets.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    inner.train()
    return {
        name: perplexity(float(totals[i]), int(totals[n + i])) for i, name in enumerate(spec.eval_domains)
    }


def _maybe_crash(spec: StageSpec, step: int, rank: int) -> None:
    """Fault injection (config ``debug``): kill this worker process once, to exercise FailureConfig."""
    dbg = spec.cfg.debug
    if dbg.crash_at_step != step or dbg.crash_stage != spec.index or rank != 0 or not dbg.crash_marker:
        return
    if os.path.exists(dbg.crash_marker):
        return
    Path(dbg.crash_marker).write_text(f"crashed at stage {spec.index} step {step}\n")
    print(f"[stage {spec.index} {spec.domain}] debug: crashing worker at step {step}", flush=True)
    os._exit(1)


def _quiet_transformers() -> None:
    """No per-load/save progress bars from transformers, no per-report INFO lines from Ray Train."""
    import logging

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
