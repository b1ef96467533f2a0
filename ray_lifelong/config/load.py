"""Load, validate and save :class:`LifelongConfig` (schema <- YAML <- ``key=value`` overrides)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ray_lifelong.config.schema import ARCHS, LifelongConfig


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> LifelongConfig:
    """Return the typed config of ``path`` with ``overrides`` applied in order: ``key=value`` items, and
    YAML files (``*.yaml``) merged over it, e.g. a method overlay from ``configs/methods/``.

    Raises:
        ConfigError: unknown key, wrong type, missing file or an inconsistent value; the message
            names the file and the dotted key.
    """
    where = str(path) if path is not None else "<defaults>"
    schema = OmegaConf.structured(LifelongConfig)
    try:
        merged = schema
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(schema, OmegaConf.load(path))
        for item in overrides:
            if "=" in item:
                # update, not merge: it also reaches into lists (data.domains.1.lr=1e-3); a mapping
                # value replaces a free-form mapping (tune.space={...} is the whole space) and fills in
                # a typed section (data.domains.1.scaling={...}) over its defaults; overlay files merge
                key = item.split("=", 1)[0].strip()
                value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
                node = OmegaConf.select(merged, key, default=None)
                free_form = isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict
                if isinstance(value, (dict, DictConfig)) and free_form:
                    OmegaConf.update(merged, key, {}, merge=False)
                OmegaConf.update(merged, key, value, merge=True)
            elif item.endswith((".yaml", ".yml")):
                if not Path(item).is_file():
                    raise ConfigError(f"config overlay not found: {item}")
                where += f" + {item}"
                merged = OmegaConf.merge(merged, OmegaConf.load(item))
            else:
                raise ConfigError(f"override {item!r} is neither key=value nor a .yaml overlay")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{where}: invalid config key {key!r}: {_first_line(e)}") from None
    except TypeError as e:  # OmegaConf: a mapping merged onto a list or the reverse
        raise ConfigError(f"{where}: {_first_line(e)} (a list given where a mapping is expected, or the reverse)") \
            from None
    validate(cfg, where)
    return apply_growth_mode(cfg)


def stage_model_sizes(cfg: LifelongConfig) -> list[dict[str, int]]:
    """The model sizes each stage trains at, after its domain's growth (head size fixed, as growth keeps it)."""
    m = cfg.model
    layers, hidden, heads, ffn = m.num_layers, m.hidden_size, m.num_heads, m.intermediate_size
    sizes = []
    for dom in cfg.data.domains:
        g = dom.grow
        if g is not None:
            head = hidden // heads
            layers = g.num_layers or layers
            if g.hidden_size:
                hidden, heads = g.hidden_size, g.num_heads or g.hidden_size // head
            elif g.num_heads:
                heads, hidden = g.num_heads, g.num_heads * head
            ffn = g.intermediate_size or ffn
        sizes.append({"num_layers": layers, "hidden_size": hidden, "num_heads": heads, "intermediate_size": ffn})
    return sizes


def final_model_sizes(cfg: LifelongConfig) -> dict[str, int]:
    """The model sizes after every growth of the schedule."""
    m = cfg.model
    initial = {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
               "intermediate_size": m.intermediate_size}
    return (stage_model_sizes(cfg) or [initial])[-1]


def frw_steps_before(cfg: LifelongConfig, index: int) -> int:
    """Function-recovering warmup steps before stage ``index``: after a growth, on the earlier domains' memory
    (``validate`` allows FRW only with replay on, and a memory is written after every stage)."""
    grows = cfg.data.domains[index].grow is not None
    return cfg.continual.frw.steps if grows and index > 0 else 0


def apply_growth_mode(cfg: LifelongConfig) -> LifelongConfig:
    """Fold ``continual.growth`` / ``growth_optimizer`` into the domains and model (idempotent)."""
    c = cfg.continual
    if c.growth == "final":
        for key, val in final_model_sizes(cfg).items():
            setattr(cfg.model, key, val)
    if c.growth in ("fixed", "final"):
        for dom in cfg.data.domains:
            dom.grow = None
    if c.growth_optimizer:
        for dom in cfg.data.domains:
            if dom.grow is not None:
                dom.grow.optimizer = c.growth_optimizer
    return cfg


def with_values(cfg: LifelongConfig, values: dict, where: str = "<config>") -> LifelongConfig:
    """A copy of ``cfg`` with dotted fields set (``{"ki.inherit.alpha0": 0.5, "data.domains.0.lr": 1e-3}``),
    type-checked against the schema and validated like a loaded config.

    Raises:
        ConfigError: naming the dotted key that is not a field or whose value does not fit.
    """
    conf = OmegaConf.structured(cfg)
    for key, value in values.items():
        try:
            OmegaConf.update(conf, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{where}: {key!r} cannot be set to {value!r}: {_first_line(e)}") from None
    out = OmegaConf.to_object(conf)
    validate(out, where)
    return apply_growth_mode(out)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def validate(cfg: LifelongConfig, where: str = "<config>") -> None:
    """Cross-field checks the type system cannot express; all problems are reported at once."""
    problems: list[str] = []

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            problems.append(f"{key}: {msg}")

    m, d, t = cfg.model, cfg.data, cfg.train
    need(m.arch in ARCHS, "model.arch", f"must be one of {ARCHS}, got {m.arch!r}")
    need(m.hidden_size % max(m.num_heads, 1) == 0, "model.hidden_size",
         f"{m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    need(d.seq_len <= m.max_position_embeddings, "data.seq_len",
         f"{d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    need(d.seq_len >= 8, "data.seq_len", "must be at least 8")
    need(0 < d.mlm_probability < 1, "data.mlm_probability", "must be in (0, 1)")
    need(d.on_bad_record in ("error", "skip"), "data.on_bad_record", "must be 'error' or 'skip'")
    need(cfg.tokenizer.kind in ("auto", "wordpiece", "bpe"), "tokenizer.kind",
         "must be auto, wordpiece or bpe")
    need(t.lr_decay in ("linear", "cosine", "constant"), "train.lr_decay", "must be linear, cosine or constant")
    need(t.steps > 0, "train.steps", "must be positive")
    need(t.lr_scope in ("stage", "run"), "train.lr_scope", "must be stage or run")
    need(t.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    need(cfg.scaling.num_workers >= 1, "scaling.num_workers", "must be >= 1")
    need(cfg.ray.startup_failures >= -1, "ray.startup_failures", "must be -1 (wait for ever) or >= 0")
    c = cfg.continual
    need(0 < c.replay.memory_fraction <= 1, "continual.replay.memory_fraction", "must be in (0, 1]")
    need(c.replay.memory_max_sequences is None or c.replay.memory_max_sequences > 0,
         "continual.replay.memory_max_sequences", "must be positive")
    need(0 <= c.replay.ratio < 1, "continual.replay.ratio", "must be in [0, 1)")
    need(c.replay.weighting in ("uniform", "proportional"), "continual.replay.weighting",
         "must be uniform or proportional")
    need(c.frw.steps >= 0 and c.frw.warmup_steps >= 0, "continual.frw.steps", "must be >= 0")
    need(c.frw.steps == 0 or c.replay.enabled, "continual.frw.steps",
         "the warmup trains on the replay memory: set continual.replay.enabled=true")
    need(c.growth in ("schedule", "fixed", "final"), "continual.growth", "must be schedule, fixed or final")
    need(c.growth_optimizer in (None, "carry", "reset"), "continual.growth_optimizer", "must be carry or reset")
    need(c.logit_kd.weight >= 0, "continual.logit_kd.weight", "must be >= 0")
    need(c.logit_kd.weight == 0 or c.replay.enabled, "continual.logit_kd.weight",
         "logit KD distils on replayed rows: set continual.replay.enabled=true")
    need(c.logit_kd.temperature > 0, "continual.logit_kd.temperature", "must be positive")
    need(not (c.joint and c.replay.enabled), "continual.joint", "joint training sees every domain already; "
         "replay would only repeat data")
    tu = cfg.tune
    need(tu.base in ("run", "ki"), "tune.base", "must be run or ki")
    need(tu.mode in ("min", "max"), "tune.mode", "must be min or max")
    need(tu.scheduler in ("asha", "fifo", "pbt"), "tune.scheduler", "must be asha, fifo or pbt")
    if tu.scheduler == "pbt":
        need(len(d.domains) == 1, "tune.scheduler",
             f"pbt clones trials between segments of one stage: the config has {len(d.domains)} domains, keep one")
        need(tu.search == "random", "tune.search", "pbt draws its own values: use search=random")
        need(tu.max_concurrent_trials >= tu.num_samples, "tune.max_concurrent_trials",
             f"pbt compares all its trials at every boundary: run all {tu.num_samples} (tune.num_samples) at once")
        need(tu.perturbation_interval >= 0 and 0 < tu.quantile_fraction <= 0.5, "tune.quantile_fraction",
             "perturbation_interval must be >= 0 and quantile_fraction in (0, 0.5]")
        # a clone continues the same weights, optimizer and data position: only values a running stage can
        # take up change between segments
        fixed = [p for p in tu.space if not (p.startswith("ki.inherit.") or ".teacher." in p
                                             or p in ("train.lr", "train.grad_clip"))]
        need(not fixed, "tune.space", f"pbt cannot change {fixed} in the middle of a stage (model, data and "
             "batch shapes are fixed): use asha or fifo for them")
    need(tu.search in ("random", "optuna"), "tune.search", "must be random or optuna")
    need(tu.num_samples >= 1 and tu.max_concurrent_trials >= 1, "tune.num_samples",
         "num_samples and max_concurrent_trials must be >= 1")
    need(tu.grace_period >= 1 and tu.reduction_factor >= 2, "tune.grace_period",
         "grace_period must be >= 1 and reduction_factor >= 2")
    for path, dim in tu.space.items():
        key = f"tune.space.{path}"
        kinds = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(dim, k) is not None]
        need(len(kinds) == 1, key, f"set exactly one of choice, grid, uniform, loguniform, randint (got {kinds})")
        if len(kinds) != 1:
            continue
        vals = getattr(dim, kinds[0])
        if kinds[0] in ("choice", "grid"):
            need(len(vals) >= 1, key, f"{kinds[0]} needs at least one value")
        else:
            need(len(vals) == 2 and vals[0] < vals[1], key, f"{kinds[0]} needs [low, high] with low < high")
            need(kinds[0] != "loguniform" or (len(vals) == 2 and vals[0] > 0), key, "loguniform needs low > 0")
        need(not (kinds[0] == "grid" and tu.search == "optuna"), key, "grid dimensions need tune.search=random")
        need(not (kinds[0] == "grid" and tu.scheduler == "pbt"), key, "pbt perturbs values: use choice, not grid")
    names = [dom.name for dom in d.domains]
    need(len(set(names)) == len(names), "data.domains", f"domain names repeat: {names}")
    f = cfg.finetune
    need(f.epochs >= 1 and f.lr > 0 and f.max_length >= 8 and f.max_concurrent >= 1, "finetune",
         "epochs and max_concurrent must be >= 1, lr > 0, max_length >= 8")
    need(f.micro_batch_size > 0 and f.batch_size % f.micro_batch_size == 0, "finetune.batch_size",
         f"must be a multiple of finetune.micro_batch_size ({f.micro_batch_size})")
    need(bool(f.seeds), "finetune.seeds", "name at least one seed")
    task_names = [t.name for t in f.tasks]
    need(len(set(task_names)) == len(task_names), "finetune.tasks", f"task names repeat: {task_names}")
    for i, task in enumerate(f.tasks):
        key = f"finetune.tasks[{i}]"
        need(task.name not in ("", "???"), f"{key}.name", "every task needs a name")
        need(task.metric in ("accuracy", "macro_f1", "micro_f1"), f"{key}.metric",
             "must be accuracy, macro_f1 or micro_f1")
        for split in ("train", "valid", "test"):
            need(bool(getattr(task, split)), f"{key}.{split}", f"task {task.name!r} lists no {split} files")
    for i, dom in enumerate(d.domains):
        key = f"data.domains[{i}]"
        need(dom.name not in ("", "???") and dom.name.replace("_", "").replace("-", "").isalnum(),
             f"{key}.name", f"must be a short alphanumeric name, got {dom.name!r}")
        need(bool(dom.train), f"{key}.train", f"domain {dom.name!r} lists no training sources")
        need(dom.format in ("auto", "jsonl", "parquet", "text"), f"{key}.format",
             "must be auto, jsonl, parquet or text")
        if dom.grow is not None:
            g = dom.grow
            need(i > 0, f"{key}.grow", "the first stage has no model to grow; set model.* instead")
            need(g.depth_init in ("identity", "copy"), f"{key}.grow.depth_init", "must be identity or copy")
            need(g.depth_placement in ("interleave", "top"), f"{key}.grow.depth_placement",
                 "must be interleave or top")
            need(g.optimizer in ("carry", "reset"), f"{key}.grow.optimizer", "must be carry or reset")
            need(g.noise_std >= 0, f"{key}.grow.noise_std", "must be >= 0")
        if dom.teacher is not None:
            k = dom.teacher
            need(bool(k.path) or bool(k.per_domain), f"{key}.teacher.path", "a teacher needs a path or per_domain")
            need(k.schedule in ("linear", "step", "constant", "cosine"), f"{key}.teacher.schedule",
                 "must be linear, step, constant or cosine")
            need(0 <= k.alpha0 <= 1, f"{key}.teacher.alpha0", "must be in [0, 1]")
            need(k.temperature > 0, f"{key}.teacher.temperature", "must be positive")
            need(k.top_k is None or k.top_k > 0, f"{key}.teacher.top_k", "must be positive")
            need(k.steps >= 0, f"{key}.teacher.steps", "must be >= 0 (0: 30% of the stage's steps)")
            unknown = sorted(set(k.per_domain) - set(names))
            need(not unknown, f"{key}.teacher.per_domain", f"unknown domains {unknown}")
        steps = dom.steps if dom.steps is not None else t.steps
        need(steps > 0, f"{key}.steps", "must be positive")
        bs = dom.batch_size if dom.batch_size is not None else t.batch_size
        sc = dom.scaling or cfg.scaling
        need(sc.num_workers >= 1, f"{key}.scaling.num_workers", "must be >= 1")
        skey = f"{key}.scaling" if dom.scaling is not None else "scaling"
        need(sc.placement_strategy in PLACEMENT, f"{skey}.placement_strategy", f"must be one of {PLACEMENT}")
        need(all(v >= 0 for v in sc.resources.values()) and not {"CPU", "GPU"} & set(sc.resources),
             f"{skey}.resources", "custom resources must be >= 0 (CPU and GPU are cpus_per_worker/gpus_per_worker)")
        per_step = t.micro_batch_size * sc.num_workers
        where_workers = f"{key}.scaling.num_workers" if dom.scaling is not None else "scaling.num_workers"
        need(bs % per_step == 0, f"{key}.batch_size" if dom.batch_size is not None else "train.batch_size",
             f"global batch {bs} is not a multiple of train.micro_batch_size x {where_workers} = {per_step}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def save_config(cfg: LifelongConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, loadable again with :func:`load_config`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def to_yaml(cfg: LifelongConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
