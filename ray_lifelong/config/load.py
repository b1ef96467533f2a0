"""Load, validate and save :class:`LifelongConfig` (schema <- YAML <- ``key=value`` overrides)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ray_lifelong.config.plan import GrowthSizeError, final_model_sizes, grown_sizes, model_sizes_of
from ray_lifelong.config.schema import LifelongConfig
from ray_lifelong.models.saved import CheckpointError, growth_problems, inspect_checkpoint, model_fields


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
    given: set[str] = set()  # the model.* fields the user set, which a checkpoint's values may not override
    required = False  # a file marks model.init_from ??? (continue a checkpoint the user names)
    try:
        merged = schema
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            raw = OmegaConf.load(path)
            given |= _model_keys(raw)
            required = _requires_init_from(raw)
            merged = OmegaConf.merge(schema, raw)
        for item in overrides:
            if "=" in item:
                # update, not merge: it also reaches into lists (data.domains.1.lr=1e-3); a mapping
                # value replaces a free-form mapping (tune.space={...} is the whole space) and fills in
                # a typed section (data.domains.1.scaling={...}) over its defaults; overlay files merge
                key = item.split("=", 1)[0].strip()
                value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
                given |= _model_keys({key: value} if "." not in key else OmegaConf.from_dotlist([item]))
                node = OmegaConf.select(merged, key, default=None)
                free_form = isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict
                if isinstance(value, (dict, DictConfig)) and free_form:
                    OmegaConf.update(merged, key, {}, merge=False)
                OmegaConf.update(merged, key, value, merge=True)
            elif item.endswith((".yaml", ".yml")):
                if not Path(item).is_file():
                    raise ConfigError(f"config overlay not found: {item}")
                where += f" + {item}"
                raw = OmegaConf.load(item)
                given |= _model_keys(raw)
                required = required or _requires_init_from(raw)
                merged = OmegaConf.merge(merged, raw)
            else:
                raise ConfigError(f"override {item!r} is neither key=value nor a .yaml overlay")
        if required and merged.model.init_from is None:
            raise ConfigError(f"{where}: model.init_from is ??? (required): give the checkpoint to start "
                              "from, e.g. model.init_from=PATH")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{where}: invalid config key {key!r}: {_first_line(e)}") from None
    except TypeError as e:  # OmegaConf: a mapping merged onto a list or the reverse
        raise ConfigError(
            f"{where}: {_first_line(e)} (a list given where a mapping is expected, or the reverse)"
        ) from None
    take_checkpoint_fields(cfg, given, where)
    validate(cfg, where)
    return apply_growth_mode(cfg)


def _requires_init_from(raw) -> bool:
    """Whether a YAML file marks ``model.init_from`` as ``???``: merged over the schema's ``None`` it would
    vanish (OmegaConf keeps the default), and the run would quietly train a fresh model."""
    model = raw.get("model") if isinstance(raw, DictConfig) else None
    return isinstance(model, DictConfig) and OmegaConf.is_missing(model, "init_from")


def _model_keys(raw) -> set[str]:
    """The ``model.*`` fields a YAML mapping (or a dotted override as one) sets."""
    model = raw.get("model") if isinstance(raw, (dict, DictConfig)) else None
    return {str(k) for k in model} if isinstance(model, (dict, DictConfig)) else set()


def take_checkpoint_fields(cfg: LifelongConfig, given: set[str] | frozenset[str] = frozenset(),
                           where: str = "<config>") -> None:
    """With ``model.init_from``: fill ``cfg.model``'s architecture and sizes in from the checkpoint's
    ``config.json`` (:func:`ray_lifelong.models.saved.model_fields`), so that the stage plans, FLOP counts
    and growth checks see the sizes the run really trains. A field in ``given`` (the user set it) must agree
    with the checkpoint, ``dropout`` excepted (it is applied to the checkpoint instead).

    Raises:
        ConfigError: the checkpoint is missing, incomplete or of an unsupported type, a given field disagrees,
            or the run asks for what a checkpoint cannot do; each problem names its key.
    """
    m = cfg.model
    if not m.init_from:
        return
    try:
        saved = inspect_checkpoint(m.init_from)
    except CheckpointError as e:
        raise ConfigError(f"{where}: model.init_from: {e}") from None
    problems, conflicts = [], []
    for key, value in model_fields(saved).items():
        if key not in given:
            setattr(m, key, value)
        elif key != "dropout" and getattr(m, key) != value:
            conflicts.append(f"model.{key}={getattr(m, key)} (the checkpoint's: {value})")
    if conflicts:
        problems.append(f"model.init_from: {saved.model_dir} (model type {saved.model_type!r}) disagrees "
                        f"with {', '.join(conflicts)}: leave these unset to take the checkpoint's")
    c = cfg.continual
    if c.growth == "final":
        problems.append("continual.growth: final trains the schedule's final size from the start, but "
                        "model.init_from starts from the checkpoint's size: use schedule or fixed")
    grows = [d.grow for d in cfg.data.domains if d.grow is not None]
    if grows and c.growth == "schedule":
        deeper = any(g.num_layers and g.num_layers > m.num_layers for g in grows)
        problems += [f"model.init_from: {p}" for p in growth_problems(saved, deeper)]
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


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
    given: set[str] = set()
    for key, value in values.items():
        try:
            OmegaConf.update(conf, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{where}: {key!r} cannot be set to {value!r}: {_first_line(e)}") from None
        given |= _model_keys(OmegaConf.from_dotlist([f"{key}=0"]) if "." in key else {key: value})
    out = OmegaConf.to_object(conf)
    take_checkpoint_fields(out, given, where)
    validate(out, where)
    return apply_growth_mode(out)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def validate(cfg: LifelongConfig, where: str = "<config>") -> None:
    """Every section's own checks (beside its fields in ``schema.py``) and the checks that span sections;
    all problems are reported at once, each naming its dotted key.

    Raises:
        ConfigError: ``"<where>: key: problem; key: problem"``.
    """
    problems = (cfg.model.problems() + cfg.data.problems() + cfg.tokenizer.problems() + cfg.train.problems()
                + cfg.scaling.problems() + cfg.ray.problems() + cfg.continual.problems() + cfg.tune.problems()
                + cfg.finetune.problems() + cfg.logging.problems() + _across_sections(cfg))
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def _across_sections(cfg: LifelongConfig) -> list[str]:
    m, d, t = cfg.model, cfg.data, cfg.train
    problems: list[str] = []

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            problems.append(f"{key}: {msg}")

    need(d.seq_len <= m.max_position_embeddings, "data.seq_len",
         f"{d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    need(cfg.ki.teacher_model.init_from is None, "ki.teacher_model.init_from",
         "the KI experiment trains its teacher from scratch; start the student with model.init_from")
    if cfg.tune.scheduler == "pbt":
        need(len(d.domains) == 1, "tune.scheduler", "pbt clones trials between segments of one stage: the "
             f"config has {len(d.domains)} domains, keep one")
    names = [dom.name for dom in d.domains]
    # each growth from the sizes the previous ones leave, as the stages will grow the model
    sizes = model_sizes_of(m) if not m.problems() else None
    for i, dom in enumerate(d.domains):
        key = f"data.domains[{i}]"
        need(dom.grow is None or i > 0, f"{key}.grow",
             "the first stage has no model to grow; set model.* instead")
        if dom.grow is not None and sizes is not None:
            try:
                sizes = grown_sizes(sizes, dom.grow, m.arch)
            except GrowthSizeError as e:
                need(False, f"{key}.grow.{e.field}", str(e))
                sizes = None  # later growths would be judged from sizes the model never has
        if dom.teacher is not None:
            unknown = sorted(set(dom.teacher.per_domain) - set(names))
            need(not unknown, f"{key}.teacher.per_domain", f"unknown domains {unknown}")
        need(dom.steps is not None or t.steps > 0, f"{key}.steps", "must be positive")
        bs = dom.batch_size if dom.batch_size is not None else t.batch_size
        workers = (dom.scaling or cfg.scaling).num_workers
        where_workers = f"{key}.scaling.num_workers" if dom.scaling is not None else "scaling.num_workers"
        per_step = t.micro_batch_size * workers
        need(bs % per_step == 0 if per_step > 0 else True,
             f"{key}.batch_size" if dom.batch_size is not None else "train.batch_size",
             f"global batch {bs} is not a multiple of train.micro_batch_size x {where_workers} = {per_step}")
    return problems


def save_config(cfg: LifelongConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, loadable again with :func:`load_config`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def to_yaml(cfg: LifelongConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
