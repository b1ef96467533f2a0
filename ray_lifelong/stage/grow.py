"""Growth at a stage boundary, on each training worker (no driver-side model).

Every rank grows the previous stage's model with the same seed, so all ranks hold the same grown
model before DDP wraps it; only the model and, with ``optimizer: carry``, the remapped AdamW state are
kept.
"""

from __future__ import annotations

import functools
import time

import torch

from ray_lifelong.config.plan import grown_sizes
from ray_lifelong.config.schema import GrowthConfig, TrainConfig
from ray_lifelong.growth import expand, logit_errors, model_sizes, new_entry_masks, remap_optimizer_state
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
               optimizer_state: dict | None, build_optimizer) -> tuple:
    """Grow ``model`` as ``grow`` says.

    Args:
        model: the previous stage's model (not modified).
        optimizer_state: the previous stage's AdamW ``state_dict`` (needed for ``grow.optimizer == "carry"``).
        build_optimizer: ``(model, lr, train) -> optimizer`` — the stage's own optimizer builder, so the
            carried state has the parameter order the stage's optimizer will have.

    Returns:
        ``(grown_model, carried_optimizer_state_dict | None, event, old)``; ``event`` records sizes,
        parameter counts, the measured logit error on random inputs and the seconds the growth took;
        ``old``: with ``grow.train: new``, the :class:`OldEntries` that keep what the growth did not add
        (its frozen parameters get no carried state), else ``None``.
    """
    t0 = time.perf_counter()
    before = model_sizes(model)
    grown, mapping = expand(model, **expand_sizes(model, grow), depth_init=grow.depth_init,
                            depth_placement=grow.depth_placement, noise_std=grow.noise_std, seed=seed,
                            return_mapping=True)
    seconds = time.perf_counter() - t0
    old = OldEntries(grown, new_entry_masks(grown, mapping)) if grow.train == "new" else None
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
        "train": grow.train,
        "trainable_params": old.trainable if old is not None else count_parameters(grown)["total"],
    }
    return grown, carried, event, old


class OldEntries:
    """``grow.train: new``: the stage after a growth trains only the entries the growth added.

    A parameter with no added entry is frozen (``requires_grad`` off, so DDP and the optimizer leave it
    out and it holds no optimizer state); in a parameter that mixes old and added entries (a grown matrix),
    the old entries' gradients are zeroed and, after every optimizer step, their values are put back, which
    also undoes AdamW's decoupled weight decay on them. ``release`` makes every parameter trainable again
    for the next stage.
    """

    def __init__(self, model, added: dict[str, torch.Tensor]):
        self.added = {n: m.cpu() for n, m in added.items()}
        self.mixed: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self.handles: list = []
        self.trainable = 0
        for name, p in model.named_parameters():
            m = self.added[name]
            self.trainable += int(m.sum())
            if not m.any():
                p.requires_grad_(False)
            elif not m.all():
                keep = ~m
                self.handles.append(p.register_hook(functools.partial(self._zero_old, len(self.mixed))))
                self.mixed.append((p, keep, p.detach()[keep].clone()))
        self.params = [p for p, *_ in self.mixed] + [p for p in model.parameters() if not p.requires_grad]

    def attach(self, optimizer) -> None:
        """Put the old entries back after every step of ``optimizer``."""
        self.handles.append(optimizer.register_step_post_hook(self._restore))

    def _on_device(self, i: int) -> tuple:
        p, keep, values = self.mixed[i]
        if keep.device != p.device:  # the model moved to its device after the growth
            self.mixed[i] = (p, keep.to(p.device), values.to(p.device))
        return self.mixed[i]

    def _zero_old(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self._on_device(i)[1], 0)

    @torch.no_grad()
    def _restore(self, optimizer, args, kwargs) -> None:
        for i in range(len(self.mixed)):
            p, keep, values = self._on_device(i)
            p[keep] = values

    def release(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for p in self.params:
            p.requires_grad_(True)

