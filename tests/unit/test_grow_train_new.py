"""``grow.train: new`` (LLaMA Pro's recipe): after a growth the stage trains only the entries the growth
added; the old entries stay exactly as they were under AdamW with weight decay, parameters with no added
entry get no optimizer state, and the next stage trains everything again."""

from __future__ import annotations

import pytest
import torch

from ray_lifelong.config import ConfigError, load_config
from ray_lifelong.config.schema import GrowthConfig, ModelConfig, TrainConfig
from ray_lifelong.models.build import LMObjective, build_model, lm_loss
from ray_lifelong.stage.grow import grow_model
from ray_lifelong.stage.step import build_optimizer

VOCAB = 61


def _model(arch: str):
    cfg = ModelConfig(arch=arch, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                      max_position_embeddings=32, **({"num_kv_heads": 2} if arch == "llama" else {}))
    return build_model(cfg, VOCAB, pad_id=0, eos_id=1, seed=0).train()


def _steps(model, opt, n: int = 3) -> None:
    for s in range(n):
        ids = torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(s))
        opt.zero_grad()
        lm_loss(*LMObjective(model)(ids, ids)).backward()
        opt.step()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("grow", [dict(num_layers=4, depth_placement="top"),  # LLaMA Pro: new blocks only
                                  dict(num_layers=3, hidden_size=48, num_heads=6, intermediate_size=96)])
def test_only_the_added_entries_train_and_the_old_ones_stay_exact(arch, grow):
    model = _model(arch)
    t = TrainConfig(weight_decay=0.1)
    g = GrowthConfig(train="new", noise_std=0.0, **grow)
    grown, _, event, old = grow_model(model, g, seed=0, train=t, lr=1e-2, optimizer_state=None,
                                      build_optimizer=build_optimizer)
    added = old.added
    before = {n: p.detach().clone() for n, p in grown.named_parameters()}
    opt = build_optimizer(grown, 1e-2, t)
    old.attach(opt)
    _steps(grown, opt)
    params = dict(grown.named_parameters())
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    for n, p in params.items():
        assert torch.equal(p.detach()[~added[n]], before[n][~added[n]]), n
        if not added[n].any():  # nothing added: frozen, not in the optimizer, no state
            assert not p.requires_grad and id(p) not in in_opt and p not in opt.state, n
    changed = [n for n, p in params.items() if not torch.equal(p.detach(), before[n])]
    assert changed and all(added[n].any() for n in changed)
    assert event["train"] == "new" and event["trainable_params"] == sum(int(m.sum()) for m in added.values())
    assert 0 < event["trainable_params"] < event["params_after"]
    # the next stage trains every parameter: released, the old entries move too
    old.release()
    assert all(p.requires_grad for p in grown.parameters())
    opt = build_optimizer(grown, 1e-2, t)
    frozen_before = {n: p.detach().clone() for n, p in params.items() if not added[n].all()}
    _steps(grown, opt, 1)
    assert any(not torch.equal(params[n].detach()[~added[n]], v[~added[n]]) for n, v in frozen_before.items())


def test_carried_adamw_state_covers_only_what_trains():
    model = _model("llama")
    t = TrainConfig()
    opt = build_optimizer(model, 1e-3, t)
    _steps(model, opt, 1)
    g = GrowthConfig(train="new", optimizer="carry", num_layers=4)
    grown, carried, _, old = grow_model(model, g, seed=0, train=t, lr=1e-3, optimizer_state=opt.state_dict(),
                                        build_optimizer=build_optimizer)
    stage_opt = build_optimizer(grown, 1e-3, t)
    stage_opt.load_state_dict(carried)  # the stage's optimizer: the trainable parameters only
    trainable = sum(p.requires_grad for p in grown.parameters())
    assert len(carried["state"]) == trainable < len(list(grown.parameters()))
    old.attach(stage_opt)
    _steps(grown, stage_opt, 1)


def test_grow_train_is_checked():
    with pytest.raises(ConfigError, match=r"grow.train: must be one of \('all', 'new'\)"):
        load_config(None, ["data.domains=[{name: a, train: [x], valid: [x]}, "
                           "{name: b, train: [x], valid: [x], grow: {num_layers: 4, train: some}}]"])
