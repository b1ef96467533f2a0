"""Growth at a stage boundary, on each training worker (no driver-side model).

Every rank grows the previous stage's model with the same seed, so all ranks hold the same grown
model before DDP wraps it; only the model and, with ``optimizer: carry``, the remapped AdamW state are
kept.
"""

from __future__ import annotations

import time

from ray_lifelong.config.plan import grown_sizes
from ray_lifelong.config.schema import GrowthConfig, TrainConfig
from ray_lifelong.growth import expand, logit_errors, model_sizes, remap_optimizer_state
from ray_lifelong.growth.llama import head_size
from ray_lifelong.models.build import count_parameters, model_arch


def expand_sizes(model, grow: GrowthConfig) -> dict[str, int | None]:
    """The size arguments of :func:`ray_lifelong.growth.expand` for ``grow`` on ``model``.

    BERT and GPT-2 take ``grow``'s sizes as they are (``expand`` derives the rest with the head size fixed,
    as the config's plan does). A Llama's growth keeps sizes independent (``hidden_size`` does not set the
    heads there), so it gets every size resolved by the plan's rule
    (:func:`ray_lifelong.config.plan.grown_sizes`: head size fixed, KV heads from ``grow.num_kv_heads`` or
    the current grouping), the sizes the stage plan and FLOP counts expect.
    """
    if model_arch(model) != "llama":
        # num_kv_heads is refused there (the config check refuses it first)
        return {"num_hidden_layers": grow.num_layers, "hidden_size": grow.hidden_size,
                "num_attention_heads": grow.num_heads, "intermediate_size": grow.intermediate_size,
                "num_key_value_heads": grow.num_kv_heads}
    s = model_sizes(model)
    now = {"num_layers": s["num_hidden_layers"], "hidden_size": s["hidden_size"],
           "num_heads": s["num_attention_heads"], "num_kv_heads": s["num_key_value_heads"],
           "intermediate_size": s["intermediate_size"]}
    new = grown_sizes(now, grow, "llama")
    return {"num_hidden_layers": new["num_layers"], "hidden_size": new["hidden_size"],
            "num_attention_heads": new["num_heads"], "num_key_value_heads": new["num_kv_heads"],
            "intermediate_size": new["intermediate_size"], "head_dim": head_size(model.config)}


def grow_model(model, grow: GrowthConfig, *, seed: int, train: TrainConfig, lr: float,
               optimizer_state: dict | None, build_optimizer) -> tuple[object, dict | None, dict]:
    """Grow ``model`` as ``grow`` says.

    Args:
        model: the previous stage's model (not modified).
        optimizer_state: the previous stage's AdamW ``state_dict`` (needed for ``grow.optimizer == "carry"``).
        build_optimizer: ``(model, lr, train) -> optimizer`` — the stage's own optimizer builder, so the
            carried state has the parameter order the stage's optimizer will have.

    Returns:
        ``(grown_model, carried_optimizer_state_dict | None, event)``; ``event`` records sizes, parameter
        counts, the measured logit error on random inputs and the seconds the growth took.
    """
    t0 = time.perf_counter()
    before = model_sizes(model)
    grown, mapping = expand(model, **expand_sizes(model, grow), depth_init=grow.depth_init,
                            depth_placement=grow.depth_placement, noise_std=grow.noise_std, seed=seed,
                            return_mapping=True)
    seconds = time.perf_counter() - t0
    carried = None
    if grow.optimizer == "carry":
        if optimizer_state is None:
            raise ValueError(
                "grow.optimizer=carry needs the previous stage's optimizer state (train_state.pt)"
            )
        old_opt = build_optimizer(model, lr, train)
        old_opt.load_state_dict(optimizer_state)
        new_opt = build_optimizer(grown, lr, train)
        remap_optimizer_state(model, grown, old_opt, new_opt, mapping)
        carried = new_opt.state_dict()
    err = logit_errors(model, grown, seed=seed)
    event = {
        "before": before,
        "after": model_sizes(grown),
        "params_before": count_parameters(model)["total"],
        "params_after": count_parameters(grown)["total"],
        "max_logit_error": err["max_abs"],
        "logit_std": err["ref_std"],
        "kl": err["kl"],
        "expand_seconds": seconds,
        "depth_init": grow.depth_init,
        "depth_placement": grow.depth_placement,
        "noise_std": grow.noise_std,
        "optimizer": grow.optimizer,
    }
    return grown, carried, event
