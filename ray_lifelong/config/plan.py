"""A run's stages as they will train, resolved once from the config: steps, batch, learning rate, the LR
schedule's span, the model sizes after each growth, the function-recovering warmup before a grown stage,
and the number of Knowledge Inheritance steps. The pipeline, the sweep, the FLOP plan, the KI report and
the benchmarks read these instead of re-deriving the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_lifelong.config.schema import LifelongConfig, TeacherConfig

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
    """``num_layers``, ``hidden_size``, ``num_heads``, ``intermediate_size`` the stage trains at."""
    frw_steps: int
    """Function-recovering warmup steps before the domain (after a growth, on the earlier domains' memory)."""
    ki_steps: int
    """Steps over which a KI teacher's weight decays (0: no teacher)."""


def ki_steps(teacher: TeacherConfig | None, stage_steps: int) -> int:
    """N_KI: ``teacher.steps``, or ``KI_DEFAULT_SHARE`` of the stage; 0 without a teacher."""
    if teacher is None:
        return 0
    return teacher.steps or max(1, int(KI_DEFAULT_SHARE * stage_steps))


def stage_model_sizes(cfg: LifelongConfig) -> list[dict[str, int]]:
    """The model sizes each stage trains at, after its domain's growth (head size fixed, as growth keeps
    it)."""
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
        sizes.append(
            {"num_layers": layers, "hidden_size": hidden, "num_heads": heads, "intermediate_size": ffn}
        )
    return sizes


def final_model_sizes(cfg: LifelongConfig) -> dict[str, int]:
    """The model sizes after every growth of the schedule."""
    m = cfg.model
    initial = {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_heads": m.num_heads,
        "intermediate_size": m.intermediate_size,
    }
    return (stage_model_sizes(cfg) or [initial])[-1]


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
