"""Typed configuration of a lifelong pre-training run.

The dataclasses below are the one schema; YAML files under ``configs/`` carry only values. OmegaConf
merges schema <- YAML <- ``key=value`` overrides and rejects unknown keys and wrong types, so a typo
fails at load time instead of silently training with a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ray_lifelong.data.memory import WEIGHTINGS
from ray_lifelong.data.sources import FORMATS, ON_BAD_RECORD
from ray_lifelong.distill.schedule import SCHEDULES
from ray_lifelong.eval.classification import METRICS
from ray_lifelong.growth.depth import DEPTH_INITS, DEPTH_PLACEMENTS
from ray_lifelong.growth.plan import GROWTH_TRAIN
from ray_lifelong.models.arch import ARCHS
from ray_lifelong.stage.schedule import LR_DECAYS

TOKENIZER_KINDS = ("auto", "wordpiece", "bpe")
PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""Ray's placement strategies for a stage's workers."""
SEARCH_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


def _failed(key: str, checks: list[tuple[bool, str, str]]) -> list[str]:
    """``"<key>.<field>: <message>"`` for every check ``(ok, field, message)`` that failed."""
    return [f"{key}.{name}: {msg}" if name else f"{key}: {msg}" for ok, name, msg in checks if not ok]


@dataclass
class GrowthConfig:
    """Grow the model at the start of a stage (ELLE / bert2BERT function-preserving expansion).

    ``None`` sizes keep the current value; head size is kept fixed, so hidden_size sets the heads. The
    sizes a growth gives, and why a growth is refused, are :func:`ray_lifelong.config.plan.grown_sizes`.
    """

    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_kv_heads: Optional[int] = None
    """Llama only: key/value heads after the growth. ``None``: unchanged while the query heads are; when they
    grow, as many as keep the current query heads per KV head (4 heads over 2 KV heads grown to 8 heads: 4
    KV heads), or the current ones where the new head count is not a multiple of that. The KV heads must
    divide the query heads, and the query heads per KV head may grow, never shrink (the query heads that
    share a KV head stay together)."""
    depth_init: str = "identity"
    """``identity`` (exact: new layers start as identities) or ``copy`` (ELLE: copies, approximate)."""
    depth_placement: str = "interleave"
    """``interleave`` (each new layer right above its source, as ELLE) or ``top``."""
    noise_std: float = 0.01
    """Gaussian noise on the fan-in side of every new copy of a unit (ELLE's BERT-base and GPT recipes: 0.01).
    It is what lets width growth add capacity: without it a copied unit and its original get identical
    gradients for ever (dropout does not break the tie of FFN units and heads), so the grown model trains as
    the small one. ``0`` makes the expansion exactly function-preserving, for checks."""
    optimizer: str = "reset"
    """``carry``: map AdamW's moments onto the grown parameters; ``reset``: a fresh optimizer (ELLE)."""
    train: str = "all"
    """``new``: the stage that follows the growth (its warmup and its domain) trains only the entries the
    growth added, new blocks and new units, as LLaMA Pro trains its added blocks; the old entries stay as
    they were, and parameters with no added entry are frozen and get no optimizer state. ``all``: every
    parameter trains."""

    def problems(self, key: str) -> list[str]:
        return _failed(key, [
            (self.depth_init in DEPTH_INITS, "depth_init", f"must be one of {DEPTH_INITS}"),
            (self.depth_placement in DEPTH_PLACEMENTS, "depth_placement",
             f"must be one of {DEPTH_PLACEMENTS}"),
            (self.optimizer in ("carry", "reset"), "optimizer", "must be carry or reset"),
            (self.train in GROWTH_TRAIN, "train", f"must be one of {GROWTH_TRAIN}"),
            (self.noise_std >= 0, "noise_std", "must be >= 0"),
        ] + [(getattr(self, k) is None or getattr(self, k) > 0, k, "must be positive")
             for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "num_kv_heads")])


@dataclass
class TeacherConfig:
    """Knowledge Inheritance for a stage: distil from smaller trained teacher(s) (Qin et al., NAACL 2022)."""

    path: Optional[str] = None
    """Teacher model: a run directory (its final_model/), a stage checkpoint, or a local HF model dir."""
    per_domain: Dict[str, str] = field(default_factory=dict)
    """Domain name -> teacher path: each example is distilled from its own domain's teacher."""
    schedule: str = "linear"
    """Inheritance rate: ``linear`` (paper default), ``step``, ``constant`` or ``cosine``."""
    steps: int = 0
    """N_KI, the steps of teacher-guided learning (linear/cosine reach 0 here); 0: 30% of the stage."""
    alpha0: float = 1.0
    temperature: float = 2.0
    top_k: Optional[int] = None
    """Keep only the teacher's top-k probabilities, renormalised (the paper: k=10 is nearly lossless)."""

    def problems(self, key: str) -> list[str]:
        return _failed(key, [
            (bool(self.path) or bool(self.per_domain), "path", "a teacher needs a path or per_domain"),
            (self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}"),
            (0 <= self.alpha0 <= 1, "alpha0", "must be in [0, 1]"),
            (self.temperature > 0, "temperature", "must be positive"),
            (self.top_k is None or self.top_k > 0, "top_k", "must be positive"),
            (self.steps >= 0, "steps", "must be >= 0 (0: 30% of the stage's steps)"),
        ])


@dataclass
class ReplayConfig:
    """Memory replay (ELLE, experience replay): keep a sample of each finished domain and mix it back in."""

    enabled: bool = False
    memory_fraction: float = 0.06
    """Share of a domain's training sequences kept in its memory (the paper keeps about 6%)."""
    memory_max_sequences: Optional[int] = None
    """Cap on a domain's memory in sequences (``None``: only the fraction)."""
    ratio: float = 0.1
    """Share of each optimizer step's sequences drawn from the memories of earlier domains (the paper:
    0.1)."""
    weighting: str = "uniform"
    """``uniform`` across earlier domains, or ``proportional`` to their memory sizes."""
    memory_path: Optional[str] = None
    """Where memories are written as Parquet (``None``: ``<run dir>/memory``). On a multi-node cluster use
    storage every node reads (NFS or ``s3://``): the stage's Ray Data tasks read it on any node."""

    def problems(self, key: str) -> list[str]:
        return _failed(key, [
            (0 < self.memory_fraction <= 1, "memory_fraction", "must be in (0, 1]"),
            (self.memory_max_sequences is None or self.memory_max_sequences > 0, "memory_max_sequences",
             "must be positive"),
            (0 <= self.ratio < 1, "ratio", "must be in [0, 1)"),
            (self.weighting in WEIGHTINGS, "weighting", f"must be one of {WEIGHTINGS}"),
        ])


@dataclass
class FRWConfig:
    """Function-recovering warmup: after a growth, train only on the earlier domains' memory first."""

    steps: int = 0
    """Optimizer steps of the warmup phase (0: none). Needs replay (its data is the memory)."""
    warmup_steps: int = 0
    """Linear LR warmup of the phase; the LR then stays at its peak (``lr``) until the phase ends."""
    lr: Optional[float] = None
    """Peak LR of the phase (``None``: the stage's)."""

    def problems(self, key: str) -> list[str]:
        return _failed(key, [(self.steps >= 0 and self.warmup_steps >= 0, "steps", "must be >= 0")])


@dataclass
class LogitKDConfig:
    """Logit-KD baseline: the previous stage's model distils into the current one on replayed rows."""

    weight: float = 0.0
    """Weight of T^2 * KL(previous || current) on the replayed positions (0: off); the CE on every
    position keeps weight 1."""
    temperature: float = 2.0

    def problems(self, key: str) -> list[str]:
        return _failed(key, [(self.weight >= 0, "weight", "must be >= 0"),
                             (self.temperature > 0, "temperature", "must be positive")])


@dataclass
class ContinualConfig:
    """What makes a run ELLE or one of its baselines (configs/elle_*.yaml, bench/elle_stream.py)."""

    prompts: bool = False
    """Prepend the domain's prompt token to every sequence (after [CLS] for BERT, first for GPT-2 and
    Llama)."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    frw: FRWConfig = field(default_factory=FRWConfig)
    logit_kd: LogitKDConfig = field(default_factory=LogitKDConfig)
    joint: bool = False
    """Upper reference: each stage trains on the union of all domains seen so far (continuing the model)."""
    growth: str = "schedule"
    """``schedule``: grow as ``data.domains[].grow`` says; ``fixed``: keep the initial size (fixed-size
    baselines, the no-growth ablation); ``final``: train the schedule's final size from the start
    (``scratch_large``). Applied when the config is loaded; the saved config holds the result."""
    growth_optimizer: Optional[str] = None
    """Override every ``grow.optimizer`` (``carry`` or ``reset``), for the carry-vs-reset ablation."""

    def problems(self, key: str = "continual") -> list[str]:
        replay = self.replay.enabled
        return (self.replay.problems(f"{key}.replay") + self.frw.problems(f"{key}.frw")
                + self.logit_kd.problems(f"{key}.logit_kd") + _failed(key, [
                    (self.frw.steps == 0 or replay, "frw.steps",
                     "the warmup trains on the replay memory: set continual.replay.enabled=true"),
                    (self.growth in ("schedule", "fixed", "final"), "growth",
                     "must be schedule, fixed or final"),
                    (self.growth_optimizer in (None, "carry", "reset"), "growth_optimizer",
                     "must be carry or reset"),
                    (self.logit_kd.weight == 0 or replay, "logit_kd.weight",
                     "logit KD distils on replayed rows: set continual.replay.enabled=true"),
                    (not (self.joint and replay), "joint",
                     "joint training sees every domain already; replay would only repeat data"),
                ]))


@dataclass
class DomainConfig:
    """One emerging domain = one training stage, in the order listed."""

    name: str = "???"
    """Short identifier; also names the domain's prompt token ``<dom:NAME>``."""
    train: List[str] = field(default_factory=list)
    """Training sources: local paths, globs, directories or URIs pyarrow reads (``s3://bucket/x/*.jsonl.gz``)."""
    valid: List[str] = field(default_factory=list)
    """Validation sources, same forms. Needed for the perplexity matrix."""
    format: str = "auto"
    """``auto`` (from the file extension), ``jsonl``, ``parquet`` or ``text`` (one document per line)."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet) holding the document text."""
    steps: Optional[int] = None
    """Optimizer steps of this domain's stage; ``None`` takes ``train.steps``."""
    batch_size: Optional[int] = None
    """Global sequences per optimizer step for this stage; ``None`` takes ``train.batch_size``."""
    lr: Optional[float] = None
    """Peak learning rate for this stage; ``None`` takes ``train.lr``."""
    grow: Optional[GrowthConfig] = None
    """Grow the model before this stage trains (not allowed on the first stage)."""
    teacher: Optional[TeacherConfig] = None
    """Knowledge Inheritance from a frozen teacher during this stage."""
    scaling: Optional["ScalingConfig"] = None
    """This stage's workers, replacing the run's ``scaling`` (e.g. more GPUs once the model has grown)."""

    def problems(self, key: str) -> list[str]:
        out = _failed(key, [
            (self.name not in ("", "???") and self.name.replace("_", "").replace("-", "").isalnum(), "name",
             f"must be a short alphanumeric name, got {self.name!r}"),
            (bool(self.train), "train", f"domain {self.name!r} lists no training sources"),
            (self.format in ("auto", *FORMATS), "format", f"must be auto or one of {FORMATS}"),
            (self.steps is None or self.steps > 0, "steps", "must be positive"),
        ])
        if self.grow is not None:
            out += self.grow.problems(f"{key}.grow")
        if self.teacher is not None:
            out += self.teacher.problems(f"{key}.teacher")
        if self.scaling is not None:
            out += self.scaling.problems(f"{key}.scaling")
        return out


@dataclass
class DataConfig:
    domains: List[DomainConfig] = field(default_factory=list)
    """The domains in arrival order."""
    seq_len: int = 128
    """Tokens per packed training sequence, special tokens included."""
    mlm_probability: float = 0.15
    """Share of tokens selected for MLM prediction (BERT); 80% [MASK], 10% random, 10% kept."""
    on_bad_record: str = "error"
    """``error``: stop with the file and line of the first bad record; ``skip``: drop and count it."""
    read_num_cpus: float = 0.25
    """Logical CPUs per file-reading task. Kept fractional so reads are scheduled next to the trainers."""
    tokenize_num_cpus: float = 0.25
    """Logical CPUs per tokenizer actor."""
    tokenize_actors: int = 1
    """Maximum size of the tokenizer actor pool (autoscales from 1). With 1, a batch's leftover tokens
    carry into the next; with more, each batch is packed on its own and drops its leftover (less than one
    row), so that the rows do not depend on which actor got which batch."""
    tokenize_batch_size: int = 128
    """Documents per tokenizer call."""
    read_chunk_docs: int = 256
    """Documents per block emitted by a file reader, so a large file streams instead of loading whole."""
    shuffle_buffer: int = 0
    """Per-worker local shuffle buffer in sequences (0 = stream order)."""
    epoch_cache_mb: int = 512
    """A worker keeps the rows of its first epoch in memory, up to this many MB, and trains later epochs of
    the stage from them instead of streaming the domain again (a stage longer than its domain); 0: always
    stream. Used with ``shuffle_buffer: 0`` only, where every epoch is the stream's order."""
    eval_max_sequences: int = 128
    """Cap on validation sequences per domain (keeps the PPL matrix cheap)."""
    pretokenize: bool = False
    """Tokenize and pack each domain's training split once into Parquet (before its stage) and stream the
    packed rows in every epoch, stage, memory sample and sweep trial, instead of re-tokenizing the text."""
    packed_path: Optional[str] = None
    """Where packed domains go (a path or ``s3://`` URI); default ``<run dir>/packed``. Each domain's
    directory is named by a hash of its sources, tokenizer, ``seq_len``, layout and prompt, so runs that
    agree on those can share one ``packed_path`` (pack it before starting them side by side)."""

    def problems(self, key: str = "data") -> list[str]:
        names = [d.name for d in self.domains]
        return _failed(key, [
            (self.seq_len >= 8, "seq_len", "must be at least 8"),
            (0 < self.mlm_probability < 1, "mlm_probability", "must be in (0, 1)"),
            (self.on_bad_record in ON_BAD_RECORD, "on_bad_record", f"must be one of {ON_BAD_RECORD}"),
            (len(set(names)) == len(names), "domains", f"domain names repeat: {names}"),
            (self.epoch_cache_mb >= 0, "epoch_cache_mb", "must be >= 0"),
        ]) + [p for i, d in enumerate(self.domains) for p in d.problems(f"{key}.domains[{i}]")]


@dataclass
class TokenizerConfig:
    path: Optional[str] = None
    """An existing Hugging Face tokenizer directory. ``None``: train one into the run directory, or with
    ``model.init_from`` take the checkpoint's. With ``model.init_from`` a path must fit the checkpoint's
    embeddings: the same token ids as the checkpoint's own tokenizer (where it has one; prompt tokens
    ``<dom:NAME>`` may be extra), and no more tokens than embedding rows."""
    kind: str = "auto"
    """``auto`` (WordPiece for bert, byte-level BPE for gpt2 and llama), ``wordpiece`` or ``bpe``."""
    vocab_size: int = 8000
    min_frequency: int = 2
    sample_docs_per_domain: int = 2000
    """Documents read from each domain's training sources to train the tokenizer."""
    reserved_prompt_tokens: int = 4
    """Extra unused ``<dom:reserved_i>`` tokens, so later domains get a prompt without a new vocabulary."""

    def problems(self, key: str = "tokenizer") -> list[str]:
        return _failed(key, [(self.kind in TOKENIZER_KINDS, "kind", f"must be one of {TOKENIZER_KINDS}")])


@dataclass
class ModelConfig:
    init_from: Optional[str] = None
    """Start the first stage from a saved model instead of a fresh one: a local Hugging Face model directory
    (``config.json``, safetensors weights, tokenizer files), a run directory (its ``final_model/``), a stage
    checkpoint (its ``model/``), or a URI of one (``s3://...``, copied once into the run directory). Its
    ``model_type`` (BERT, RoBERTa, GPT-2, Llama, Mistral, Qwen2) gives ``arch``, and its ``config.json`` the
    sizes below; its tokenizer is the run's (``tokenizer.*`` training is skipped). Checked when the config
    is loaded: a size or ``arch`` set here that disagrees with the checkpoint is refused, one left unset is
    filled in (the saved config holds the checkpoint's). ``dropout`` alone may differ: it is applied."""
    arch: str = "bert"
    """``bert`` (BertForMaskedLM, MLM), ``gpt2`` (GPT2LMHeadModel, causal LM) or ``llama``
    (LlamaForCausalLM, causal LM: RMSNorm, rotary positions, SwiGLU FFN, grouped-query attention). With
    ``init_from``: the checkpoint's (RoBERTa is ``bert``, Mistral and Qwen2 are ``llama``)."""
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 2
    intermediate_size: int = 512
    """FFN width; Llama's SwiGLU has three matrices of this width (gate, up, down), BERT's and GPT-2's two."""
    num_kv_heads: Optional[int] = None
    """Llama: key/value heads of grouped-query attention; must divide ``num_heads`` (``None``: as many as
    ``num_heads``, plain multi-head attention). BERT and GPT-2 have one per query head: ``None`` or
    ``num_heads`` only."""
    tie_embeddings: Optional[bool] = None
    """Whether the output layer shares the input embedding's weights. ``None``: the architecture's own
    (BERT and GPT-2 tied, Llama untied, as Llama 2 and 3). Llama-only as a choice: BERT and GPT-2 are
    always built tied here (their HF classes' default, which every BERT/GPT-2 run and benchmark so far
    used), so ``false`` is refused for them rather than silently ignored."""
    rope_theta: float = 10000.0
    """Llama: base of the rotary position frequencies (BERT and GPT-2 learn absolute positions instead)."""
    max_position_embeddings: int = 512
    """Positions a sequence may use (``data.seq_len`` must fit); RoBERTa's table holds two more rows, for
    the padding index and the one before the first position."""
    dropout: float = 0.1
    vocab_multiple: int = 64
    """Embedding rows are the tokenizer's size rounded up to this multiple (1: exact). An odd vocabulary
    (GPT-2's 50257) sends the output layer to a slow unaligned GEMM: 1.55x on a GPT-2-small step (H200)."""

    def kv_heads(self) -> int:
        """Key/value heads of the model as built (``num_heads`` unless Llama's ``num_kv_heads`` is set)."""
        return self.num_kv_heads or self.num_heads

    def ties_embeddings(self) -> bool:
        """Whether the built model ties its output layer to the input embedding (``tie_embeddings``)."""
        return self.tie_embeddings if self.tie_embeddings is not None else self.arch != "llama"

    def problems(self, key: str = "model") -> list[str]:
        llama, kv = self.arch == "llama", self.num_kv_heads
        return _failed(key, [
            (self.arch in ARCHS, "arch", f"must be one of {ARCHS}, got {self.arch!r}"),
            (self.num_heads > 0, "num_heads", "must be positive"),
            (self.hidden_size % max(self.num_heads, 1) == 0, "hidden_size",
             f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}"),
            (kv is None or (kv > 0 and self.num_heads % kv == 0), "num_kv_heads",
             f"{kv} does not divide model.num_heads={self.num_heads}: every KV head serves the same number "
             "of query heads"),
            (llama or kv is None or kv == self.num_heads, "num_kv_heads",
             f"grouped-query attention is Llama's (model.arch={self.arch} has one KV head per query head)"),
            (llama or self.tie_embeddings is not False, "tie_embeddings",
             f"model.arch={self.arch} is always built tied; untied output layers are Llama's "
             "(model.arch=llama)"),
            (self.rope_theta > 0, "rope_theta", "must be positive"),
        ])


@dataclass
class TrainConfig:
    steps: int = 100
    """Default optimizer steps per stage."""
    batch_size: int = 16
    """Global sequences per optimizer step (all workers, all accumulation micro-steps)."""
    micro_batch_size: int = 16
    """Sequences per worker per forward pass; accumulation = batch_size / (micro_batch_size * workers)."""
    lr: float = 1e-3
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    warmup_ratio: float = 0.06
    """Share of the stage's steps with linear warmup."""
    lr_decay: str = "linear"
    """``linear``, ``cosine`` or ``constant`` after warmup."""
    lr_scope: str = "stage"
    """``stage``: every stage warms up and decays on its own; ``run``: one schedule over all stages' steps
    (staged training: no re-warmup after a growth, which costs most of growth's saving, bench/growth.py)."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU, where fp32 is faster)."""
    compile: bool = False
    """``torch.compile`` the training forward (fuses the element-wise work; the first steps compile)."""
    log_every: int = 10
    eval_every: int = 0
    """Validation on every domain each N steps (0: only at the end of the stage)."""
    checkpoint_every: int = 50
    """Report a checkpoint every N steps (and always at the end)."""
    seed: int = 0
    torch_threads: int = 0
    """torch intra-op threads per worker (0 leaves Ray's default, one per logical CPU of the worker)."""

    def problems(self, key: str = "train") -> list[str]:
        return _failed(key, [
            (self.lr_decay in LR_DECAYS, "lr_decay", f"must be one of {LR_DECAYS}"),
            (self.steps > 0, "steps", "must be positive"),
            (self.lr_scope in ("stage", "run"), "lr_scope", "must be stage or run"),
            (self.micro_batch_size > 0, "micro_batch_size", "must be positive"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
        ])


@dataclass
class ScalingConfig:
    """Mirrors ``ray.train.ScalingConfig``."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    """Fractional on small machines so Ray Data's read and tokenize tasks still get a CPU."""
    gpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    """PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one worker per node), as Ray placement groups."""
    resources: Dict[str, float] = field(default_factory=dict)
    """Extra custom resources per worker (e.g. ``{trainer: 1}`` to keep workers on labelled nodes)."""

    def problems(self, key: str = "scaling") -> list[str]:
        return _failed(key, [
            (self.num_workers >= 1, "num_workers", "must be >= 1"),
            (self.placement_strategy in PLACEMENT, "placement_strategy", f"must be one of {PLACEMENT}"),
            (all(v >= 0 for v in self.resources.values()) and not {"CPU", "GPU"} & set(self.resources),
             "resources", "custom resources must be >= 0 (CPU and GPU are cpus_per_worker/gpus_per_worker)"),
        ])


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Cluster address; ``None`` joins ``RAY_ADDRESS`` when set (ray job submit) or starts a local one."""
    num_cpus: Optional[int] = None
    """Logical CPUs of a locally started cluster (``None``: the machine's)."""
    storage_path: Optional[str] = None
    """Where Ray Train writes checkpoints (local, NFS or ``s3://``); ``None``: ``<run dir>/checkpoints``."""
    max_failures: int = 2
    """Worker-group restarts per Ray Train run (the consecutive stages of one ``scaling``) before it fails;
    each restart resumes from the last checkpoint."""
    startup_failures: int = -1
    """Times a stage's workers may fail to get their resources (each try waits
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 60 s by default) before the stage fails with Ray Train's
    message; -1 waits for ever, e.g. for the autoscaler to add GPU nodes or a lost node to come back."""
    num_to_keep: int = 2
    """Checkpoints kept per Ray Train run besides every stage's final one (the latest are kept)."""

    def problems(self, key: str = "ray") -> list[str]:
        return _failed(key, [(self.startup_failures >= -1, "startup_failures",
                              "must be -1 (wait for ever) or >= 0")])


@dataclass
class DemoConfig:
    """The embedded synthetic multi-domain corpus, written on first use."""

    enabled: bool = False
    dir: str = "data/demo"
    domains: List[str] = field(default_factory=lambda: ["sports", "cooking", "astronomy", "finance"])
    train_docs: int = 1200
    valid_docs: int = 80
    shards: int = 2
    seed: int = 0


@dataclass
class KIExperimentConfig:
    """``ray-lifelong ki``: train a small teacher, then the configured (larger) student with KI and, as the
    baseline, without it: same tokenizer, data order and seed (Qin et al., NAACL 2022)."""

    teacher_model: ModelConfig = field(
        default_factory=lambda: ModelConfig(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=256)
    )
    teacher_steps: int = 200
    """Steps of the teacher's own training on each domain."""
    teacher_lr: Optional[float] = None
    inherit: TeacherConfig = field(default_factory=TeacherConfig)
    """Schedule, N_KI, alpha0, temperature, top_k of the student's inheritance (``path`` is filled in)."""
    baseline: bool = True
    """Also train the student without KI, for the comparison."""


@dataclass
class SearchDim:
    """One dimension of a sweep's search space: exactly one of these is set."""

    choice: Optional[List[Any]] = None
    """Sample uniformly from these values."""
    grid: Optional[List[Any]] = None
    """Every value, crossed with the other grid dimensions (each combination ``num_samples`` times)."""
    uniform: Optional[List[float]] = None
    """``[low, high]``."""
    loguniform: Optional[List[float]] = None
    """``[low, high]``, both positive; sampled uniformly in log space (learning rates)."""
    randint: Optional[List[int]] = None
    """``[low, high]``: an integer in ``low <= x < high``."""

    def problems(self, key: str) -> list[str]:
        kinds = [k for k in SEARCH_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            return [f"{key}: set exactly one of {', '.join(SEARCH_KINDS)} (got {kinds})"]
        kind, vals = kinds[0], getattr(self, kinds[0])
        if kind in ("choice", "grid"):
            return _failed(key, [(len(vals) >= 1, "", f"{kind} needs at least one value")])
        return _failed(key, [
            (len(vals) == 2 and vals[0] < vals[1], "", f"{kind} needs [low, high] with low < high"),
            (kind != "loguniform" or (len(vals) == 2 and vals[0] > 0), "", "loguniform needs low > 0"),
        ])


@dataclass
class SweepConfig:
    """``ray-lifelong tune``: a Ray Tune sweep whose trials are runs of this config with sampled fields."""

    space: Dict[str, SearchDim] = field(default_factory=dict)
    """Dotted config path -> dimension, e.g. ``ki.inherit.alpha0: {uniform: [0.2, 1.0]}``."""
    base: str = "run"
    """``run``: each trial is this config's run. ``ki``: the KI experiment's teacher is trained once, then
    each trial is the KI student (``ki.inherit.*`` are then the fields to search)."""
    metric: str = "valid_loss"
    """Reported at every evaluation (``train.eval_every``) and at the end of each stage."""
    mode: str = "min"
    num_samples: int = 4
    max_concurrent_trials: int = 1
    """Trials running at once; lowered at the start (with a line saying so) to what the cluster holds, each
    trial counted with its driver, its workers and its data pipeline's CPUs (see ``fit_to_cluster``)."""
    fit_to_cluster: bool = True
    """Check ``max_concurrent_trials`` against the cluster's CPUs and GPUs when the sweep starts. Set false
    on a cluster that autoscales to the trials' demand (its resources at the start are not its limit)."""
    scheduler: str = "asha"
    """``asha`` (stops poor trials early on the reported metric), ``fifo`` (runs every trial to the end) or
    ``pbt`` (population-based training: at every segment boundary the worst trials continue from the best
    ones' checkpoints with perturbed values; one-domain configs, values the run can change mid-stage)."""
    perturbation_interval: int = 0
    """PBT: steps per segment (0: ``train.eval_every``, else a quarter of the stage)."""
    quantile_fraction: float = 0.25
    """PBT: the bottom fraction of trials that clone the top fraction at each boundary."""
    resample_probability: float = 0.25
    """PBT: chance that a cloned value is drawn afresh from the space rather than perturbed."""
    search: str = "random"
    """``random`` (Tune's variant generator, grid dimensions expanded) or ``optuna`` (needs optuna)."""
    grace_period: int = 1
    """ASHA: evaluations every trial gets before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: the fraction 1/reduction_factor of trials continues at each rung."""
    trial_cpus: float = 0.25
    """CPU of a trial's driver (it only orchestrates; the stage's workers take ``scaling.*``)."""
    storage_path: Optional[str] = None
    """Where Tune keeps the sweep's state (local, NFS or ``s3://``); default
    ``<output_dir>/<run_name>/tune``."""
    seed: int = 0
    """Seeds the search (random sampling or Optuna): the same config samples the same trials."""

    def problems(self, key: str = "tune") -> list[str]:
        pbt = self.scheduler == "pbt"
        out = _failed(key, [
            (self.base in ("run", "ki"), "base", "must be run or ki"),
            (self.mode in ("min", "max"), "mode", "must be min or max"),
            (self.scheduler in ("asha", "fifo", "pbt"), "scheduler", "must be asha, fifo or pbt"),
            (self.search in ("random", "optuna"), "search", "must be random or optuna"),
            (self.num_samples >= 1 and self.max_concurrent_trials >= 1, "num_samples",
             "num_samples and max_concurrent_trials must be >= 1"),
            (self.grace_period >= 1 and self.reduction_factor >= 2, "grace_period",
             "grace_period must be >= 1 and reduction_factor >= 2"),
            (not pbt or self.search == "random", "search", "pbt draws its own values: use search=random"),
            (not pbt or self.max_concurrent_trials >= self.num_samples, "max_concurrent_trials",
             f"pbt compares all its trials at every boundary: run all {self.num_samples} (tune.num_samples) "
             "at once"),
            (not pbt or (self.perturbation_interval >= 0 and 0 < self.quantile_fraction <= 0.5),
             "quantile_fraction", "perturbation_interval must be >= 0 and quantile_fraction in (0, 0.5]"),
        ])
        if pbt:
            # a clone continues the same weights, optimizer and data position: only values a running stage
            # can take up change between segments
            fixed = [p for p in self.space if not (p.startswith("ki.inherit.") or ".teacher." in p
                                                   or p in ("train.lr", "train.grad_clip"))]
            out += _failed(key, [(not fixed, "space", f"pbt cannot change {fixed} in the middle of a stage "
                                  "(model, data and batch shapes are fixed): use asha or fifo for them")])
        for path, dim in self.space.items():
            out += dim.problems(f"{key}.space.{path}")
            grid = dim.grid is not None
            out += _failed(f"{key}.space.{path}", [
                (not (grid and self.search == "optuna"), "", "grid dimensions need tune.search=random"),
                (not (grid and pbt), "", "pbt perturbs values: use choice, not grid"),
            ])
        return out


@dataclass
class TaskConfig:
    """One labelled downstream task: ``{text, label}`` records (JSON lines or Parquet, local or URIs)."""

    name: str = "???"
    domain: Optional[str] = None
    """The pre-training domain whose prompt is prepended (``None``: the task's name)."""
    train: List[str] = field(default_factory=list)
    valid: List[str] = field(default_factory=list)
    test: List[str] = field(default_factory=list)
    metric: str = "accuracy"
    """``accuracy``, ``macro_f1`` or ``micro_f1``; model selection (epoch) uses it on valid."""
    text_field: str = "text"
    label_field: str = "label"
    max_train_examples: Optional[int] = None
    """Fine-tune on the first N training records only (the files' own order); the classes still come from
    the whole training split."""

    def problems(self, key: str) -> list[str]:
        return _failed(key, [
            (self.name not in ("", "???"), "name", "every task needs a name"),
            (self.metric in METRICS, "metric", f"must be one of {tuple(METRICS)}"),
        ] + [(bool(getattr(self, split)), split, f"task {self.name!r} lists no {split} files")
             for split in ("train", "valid", "test")])


@dataclass
class FinetuneConfig:
    """``ray-lifelong finetune``: a classification head on a pre-trained model, per task and seed."""

    model: Optional[str] = None
    """A run directory, its ``final_model/``, a stage checkpoint or an HF model directory (local or URI);
    ``None``: this config's run's ``final_model``."""
    tasks: List[TaskConfig] = field(default_factory=list)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    prompts: Optional[bool] = None
    """Prepend the task domain's prompt token; ``None``: when the model was pre-trained with prompts."""
    epochs: int = 3
    batch_size: int = 32
    micro_batch_size: int = 32
    lr: float = 1.0e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 128
    max_concurrent: int = 2
    """Fine-tuning runs (task x seed) at once, each a Ray Train run (a Tune trial)."""
    scaling: Optional[ScalingConfig] = None
    """Workers of each fine-tuning run (``None``: the run's ``scaling``)."""
    output: str = "downstream"
    """Results directory, under the run directory."""

    def problems(self, key: str = "finetune") -> list[str]:
        names = [t.name for t in self.tasks]
        return _failed(key, [
            (self.epochs >= 1 and self.lr > 0 and self.max_length >= 8 and self.max_concurrent >= 1, "",
             "epochs and max_concurrent must be >= 1, lr > 0, max_length >= 8"),
            (self.micro_batch_size > 0 and self.batch_size % self.micro_batch_size == 0, "batch_size",
             f"must be a multiple of finetune.micro_batch_size ({self.micro_batch_size})"),
            (bool(self.seeds), "seeds", "name at least one seed"),
            (len(set(names)) == len(names), "tasks", f"task names repeat: {names}"),
        ]) + [p for i, t in enumerate(self.tasks) for p in t.problems(f"{key}.tasks[{i}]")]


@dataclass
class LoggingConfig:
    """Where a run's metrics go besides ``results.json`` (:mod:`ray_lifelong.tracking`)."""

    tensorboard: bool = True
    """TensorBoard event files under ``<run dir>/tensorboard/``."""
    mlflow: Optional[str] = None
    """An MLflow tracking URI (``file:/path``, ``sqlite:///mlflow.db``, ``http://host:5000``): the run is
    logged there too; ``None``: no MLflow."""
    mlflow_experiment: str = "ray_lifelong"

    def problems(self, key: str = "logging") -> list[str]:
        if self.mlflow is None:
            return []
        try:
            import mlflow  # noqa: F401
        except ImportError:
            return [f"{key}.mlflow: needs the mlflow package (pip install 'ray_lifelong[mlflow]')"]
        return []


@dataclass
class DebugConfig:
    """Fault injection for tests: kill one worker process once at this step of this stage."""

    crash_at_step: Optional[int] = None
    crash_stage: int = 0
    crash_marker: Optional[str] = None
    """File created before the crash so that the restarted worker does not crash again."""
    slow_step_s: float = 0.0
    """Seconds each optimizer step sleeps: widens the window in which tests kill a driver or a node."""


@dataclass
class LifelongConfig:
    run_name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    ki: KIExperimentConfig = field(default_factory=KIExperimentConfig)
    tune: SweepConfig = field(default_factory=SweepConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
