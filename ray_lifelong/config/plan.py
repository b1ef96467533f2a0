"""A run's stages as they will train, resolved once from the config: steps, batch, learning rate, the LR
schedule's span, the model sizes after each growth, the function-recovering warmup before a grown stage,
and the number of Knowledge Inheritance steps. The pipeline, the sweep, the FLOP plan, the KI report and
the benchmarks read these instead of re-deriving the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_lifelong.config.schema import GrowthConfig, LifelongConfig, ModelConfig, TeacherConfig

KI_DEFAULT_SHARE = 0.3
"""Without ``teacher.steps``, inheritance lasts this share of the stage (KI paper: about the first third)."""


@dataclass(frozen=True)
class StagePlan:
    index: int
    domain: str
    steps: int
    batch_size: int
    lr: float
    schedule: tuple[int, int] | None
    """``(offset, total)`` within one run-wide LR schedule (``train.lr_scope: run``); ``None``: its own."""
    sizes: dict[str, int]
    """``num_layers``, ``hidden_size``, ``num_heads``, ``intermediate_size`` the stage trains at, and
    ``num_kv_heads`` for Llama (:func:`model_sizes_of`)."""
    frw_steps: int
    """Function-recovering warmup steps before the domain (after a growth, on the earlier domains' memory)."""
    ki_steps: int
    """Steps over which a KI teacher's weight decays (0: no teacher)."""

    @property
    def label(self) -> str:
        """``<ii>-<domain>``: the stage's name in logs, markers and the run directory."""
        return f"{self.index:02d}-{self.domain}"


def ki_steps(teacher: TeacherConfig | None, stage_steps: int) -> int:
    """N_KI: ``teacher.steps``, or ``KI_DEFAULT_SHARE`` of the stage; 0 without a teacher."""
    if teacher is None:
        return 0
    return teacher.steps or max(1, int(KI_DEFAULT_SHARE * stage_steps))


class GrowthSizeError(ValueError):
    """A growth the model cannot take; ``field`` is the ``grow`` key to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def model_sizes_of(m: ModelConfig) -> dict[str, int]:
    """The sizes of ``model.*`` in a stage plan's keys; Llama's carry ``num_kv_heads`` (BERT and GPT-2 have
    one KV head per query head, so theirs do not)."""
    sizes = {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
             "intermediate_size": m.intermediate_size}
    if m.arch == "llama":
        sizes["num_kv_heads"] = m.kv_heads()
    return sizes


def grown_sizes(sizes: dict[str, int], grow: GrowthConfig, arch: str) -> dict[str, int]:
    """The sizes after ``grow`` of a model of ``sizes`` (a stage plan's keys), by the rules
    :func:`ray_lifelong.growth.expand` follows, so that a growth it would refuse fails when the config is
    checked:

    * the head size ``hidden_size / num_heads`` stays fixed: ``hidden_size`` alone sets the heads,
      ``num_heads`` alone sets the hidden size, both must agree with it;
    * no size shrinks;
    * Llama: ``num_kv_heads`` given, or else unchanged while the query heads are, and when they grow as
      many as keep the current query heads per KV head (the current ones where the new head count is not
      a multiple of that); the KV heads must divide the query heads, and the query heads per KV head may
      grow but not shrink (growth keeps the query heads that share a KV head together).

    Raises:
        GrowthSizeError: naming the ``grow`` field at fault.
    """
    llama = arch == "llama"
    if grow.num_kv_heads is not None and not llama:
        raise GrowthSizeError("num_kv_heads", f"grouped-query attention is Llama's (model.arch={arch})")
    layers, hidden, heads, ffn = (sizes[k] for k in ("num_layers", "hidden_size", "num_heads",
                                                     "intermediate_size"))
    head = hidden // heads
    new_hidden, new_heads = hidden, heads
    if grow.hidden_size and grow.num_heads:
        new_hidden, new_heads = grow.hidden_size, grow.num_heads
        if new_hidden != new_heads * head:
            raise GrowthSizeError("hidden_size", f"hidden_size {new_hidden} / num_heads {new_heads} changes "
                                  f"the head size {head} (hidden {hidden} / {heads} heads), which growth "
                                  f"keeps: set hidden_size = num_heads x {head}")
    elif grow.hidden_size:
        new_hidden = grow.hidden_size
        if new_hidden % head:
            raise GrowthSizeError("hidden_size", f"{new_hidden} is not a multiple of the head size {head} "
                                  f"(hidden {hidden} / {heads} heads), which growth keeps")
        new_heads = new_hidden // head
    elif grow.num_heads:
        new_heads, new_hidden = grow.num_heads, grow.num_heads * head
    out = {"num_layers": grow.num_layers or layers, "hidden_size": new_hidden, "num_heads": new_heads,
           "intermediate_size": grow.intermediate_size or ffn}
    old = {**sizes, "num_kv_heads": sizes.get("num_kv_heads") or heads}
    if llama:
        kv, group = old["num_kv_heads"], heads // old["num_kv_heads"]
        if grow.num_kv_heads is not None:
            out["num_kv_heads"] = grow.num_kv_heads
        elif new_heads == heads or new_heads % group:
            out["num_kv_heads"] = kv  # a ratio that cannot be kept is reported below, naming num_kv_heads
        else:
            out["num_kv_heads"] = new_heads // group
    shrunk = [k for k, v in out.items() if v < old[k]]
    if shrunk:
        raise GrowthSizeError(shrunk[0], "growth cannot shrink a model: "
                              + ", ".join(f"{k} {old[k]} -> {out[k]}" for k in shrunk))
    if llama:
        kv1 = out["num_kv_heads"]
        if new_heads % kv1:
            hint = "" if grow.num_kv_heads is not None else (
                f" (the {heads // kv} query heads per KV head of now cannot be kept: set grow.num_kv_heads)")
            raise GrowthSizeError("num_kv_heads", f"{kv1} KV heads do not divide the {new_heads} query "
                                  f"heads: every KV head serves the same number of query heads{hint}")
        if new_heads // kv1 < group:
            raise GrowthSizeError("num_kv_heads", f"{new_heads} query heads over {kv1} KV heads is "
                                  f"{new_heads // kv1} per KV head, fewer than the {group} now: the query "
                                  "heads that share a KV head would be split")
    return out


def stage_model_sizes(cfg: LifelongConfig) -> list[dict[str, int]]:
    """The model sizes each stage trains at, after its domain's growth (:func:`grown_sizes`; head size fixed,
    as growth keeps it).

    Raises:
        GrowthSizeError: for a growth the model cannot take (``validate`` reports it with its key first).
    """
    size = model_sizes_of(cfg.model)
    sizes = []
    for dom in cfg.data.domains:
        if dom.grow is not None:
            size = grown_sizes(size, dom.grow, cfg.model.arch)
        sizes.append(dict(size))
    return sizes


def final_model_sizes(cfg: LifelongConfig) -> dict[str, int]:
    """The model sizes after every growth of the schedule."""
    return (stage_model_sizes(cfg) or [model_sizes_of(cfg.model)])[-1]


def frw_steps_before(cfg: LifelongConfig, index: int) -> int:
    """Function-recovering warmup steps before stage ``index``: after a growth, on the earlier domains' memory
    (``validate`` allows FRW only with replay on, and a memory is written after every stage)."""
    grows = cfg.data.domains[index].grow is not None
    return cfg.continual.frw.steps if grows and index > 0 else 0


def stage_plans(cfg: LifelongConfig) -> list[StagePlan]:
    """Every stage of ``cfg``'s run, in order."""
    doms = cfg.data.domains
    steps = [d.steps or cfg.train.steps for d in doms]
    run_wide = cfg.train.lr_scope == "run"
    return [
        StagePlan(
            index=i,
            domain=d.name,
            steps=steps[i],
            batch_size=d.batch_size or cfg.train.batch_size,
            lr=d.lr or cfg.train.lr,
            schedule=(sum(steps[:i]), sum(steps)) if run_wide else None,
            sizes=size,
            frw_steps=frw_steps_before(cfg, i),
            ki_steps=ki_steps(d.teacher, steps[i]),
        )
        for i, (d, size) in enumerate(zip(doms, stage_model_sizes(cfg)))
    ]


def stage_groups(cfg: LifelongConfig) -> list[list[int]]:
    """The stages, in order, cut where a stage's workers (``scaling``) differ from the stage before: each
    group trains in one Ray Train run, one worker group taking its stages in turn."""
    groups: list[list[int]] = []
    last = object()
    for i, d in enumerate(cfg.data.domains):
        scaling = d.scaling or cfg.scaling
        if scaling != last:
            groups.append([])
        groups[-1].append(i)
        last = scaling
    return groups
