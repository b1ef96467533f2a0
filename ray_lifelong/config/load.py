"""Load, validate and save :class:`LifelongConfig` (schema <- YAML <- ``key=value`` overrides)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ray_lifelong.config.plan import GrowthSizeError, final_model_sizes, grown_sizes, model_sizes_of
from ray_lifelong.config.schema import LifelongConfig


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
        raise ConfigError(
            f"{where}: {_first_line(e)} (a list given where a mapping is expected, or the reverse)"
        ) from None
    validate(cfg, where)
    return apply_growth_mode(cfg)


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
