"""Exact growth of Llama-family decoders (ray_lifelong.growth.llama through ``expand``).

Tiny random ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` models whose weights are
perturbed away from their initialisation (RMSNorm gains far from 1, biases non-zero), float32, CPU, no Ray.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.utils import logging as hf_logging

from ray_lifelong.growth import expand, max_logit_error, model_sizes, new_entry_masks, remap_optimizer_state
from ray_lifelong.growth.plan import gather_value, unit_mask

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

VOCAB = 61
TOL = 1e-5
EPS = 1e-5
CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(arch: str = "llama", *, layers: int = 2, hidden: int = 32, heads: int = 4, kv: int = 2,
         head: int = 8, ffn: int = 40, tied: bool = True, seed: int = 0, bias: bool = False):
    """A tiny model, every weight perturbed by N(0, 0.1^2) and every RMSNorm gain drawn from U(0.5, 1.5)."""
    cfg_cls, cls = CLASSES[arch]
    extra = {"attention_bias": bias} if arch == "llama" else {}
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, head_dim=head, intermediate_size=ffn, max_position_embeddings=64,
                  rms_norm_eps=EPS, tie_word_embeddings=tied, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def ids(n: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ the construction

@pytest.mark.parametrize("d, d_new", [(64, 96), (48, 80), (64, 128), (24, 25), (16, 100)])
def test_rmsnorm_on_zero_padded_input_with_scaled_gain_and_eps_is_unchanged(d, d_new):
    """The hidden-width lemma: for ``x' = [x, 0]`` (d' - d zeros), ``mean(x'^2) = (d/d') mean(x^2)``, so an
    RMSNorm with ``eps' = eps d/d'`` and gains ``sqrt(d/d') g`` gives ``[RMSNorm(x), 0]`` for any d'."""
    gen = torch.Generator().manual_seed(d * d_new)
    g = 0.5 + torch.rand(d, generator=gen)
    x = torch.randn(3, 5, d, generator=gen) * torch.tensor([0.01, 1.0, 30.0])[:, None, None]
    old = LlamaRMSNorm(d, eps=EPS)
    new = LlamaRMSNorm(d_new, eps=EPS * d / d_new)
    s = (d / d_new) ** 0.5
    with torch.no_grad():
        old.weight.copy_(g)
        new.weight.copy_(torch.cat([g * s, torch.full((d_new - d,), 0.7)]))
        y, y_new = old(x), new(torch.cat([x, x.new_zeros(3, 5, d_new - d)], -1))
        assert (y_new[..., :d] - y).abs().max() <= 1e-6 * y.abs().max()
        assert not y_new[..., d:].any()
        # without eps' the rows of small norm are off (the check is not vacuous)
        new.variance_epsilon = EPS
        assert (new(torch.cat([x, x.new_zeros(3, 5, d_new - d)], -1))[0, ..., :d] - y[0]).abs().max() > 1e-4


@PROPS
@given(layers=st.integers(1, 3), more_layers=st.integers(0, 2), head=st.sampled_from([4, 8]),
       kv=st.integers(1, 2), group=st.integers(1, 3), more_kv=st.integers(0, 2), more_group=st.integers(0, 2),
       width=st.integers(2, 12), more_width=st.integers(0, 8), ffn=st.integers(8, 40),
       more_ffn=st.integers(0, 30), tied=st.booleans(), placement=st.sampled_from(["interleave", "top"]),
       seed=st.integers(0, 10_000))
def test_growth_is_exact_for_any_sizes(layers, more_layers, head, kv, group, more_kv, more_group, width,
                                       more_width, ffn, more_ffn, tied, placement, seed):
    """Any non-shrinking growth that keeps the head size and the grouping: logits within 1e-5, the input model
    untouched, the config carrying the new sizes, and the new residual dimensions exactly zero everywhere.
    LlamaConfig wants the hidden size to be a multiple of the head count, so hidden sizes are drawn as such;
    most factors are not integers (e.g. 4 heads x 6 = 24 -> 6 heads x 5 = 30)."""
    heads, kv1, group1 = kv * group, kv + more_kv, group + more_group
    hidden = heads * width
    hidden1 = kv1 * group1 * (-(-hidden // (kv1 * group1)) + more_width)
    model = make(layers=layers, hidden=hidden, heads=heads, kv=kv, head=head, ffn=ffn, tied=tied, seed=seed)
    before = state(model)
    target = {"num_hidden_layers": layers + more_layers, "hidden_size": hidden1,
              "num_attention_heads": kv1 * group1, "num_key_value_heads": kv1,
              "intermediate_size": ffn + more_ffn}
    grown = expand(model, **target, depth_placement=placement, seed=seed)
    assert model_sizes(grown) == target
    c = grown.config
    assert c.head_dim == head and c.rms_norm_eps == pytest.approx(EPS * hidden / hidden1)
    assert (grown.get_output_embeddings().weight is grown.get_input_embeddings().weight) == tied
    assert max_logit_error(model, grown, seed=seed) <= TOL
    with torch.no_grad():
        states = grown(input_ids=ids(seed=seed), output_hidden_states=True).hidden_states
    assert all(not h[..., hidden:].any() for h in states)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# on a 2-layer model, hidden 48, 4 query heads on 2 KV heads of size 8, FFN 40
CASES = {
    "depth_only": dict(num_hidden_layers=4),
    "depth_top": dict(num_hidden_layers=5, depth_placement="top"),
    "ffn_only": dict(intermediate_size=77),
    "heads_and_kv": dict(num_attention_heads=6, num_key_value_heads=3),
    "heads_larger_groups": dict(num_attention_heads=12, num_key_value_heads=3),
    "hidden_x1.5": dict(hidden_size=72),
    "hidden_x2": dict(hidden_size=96),
    "hidden_x5/3": dict(hidden_size=80),
    "combined": dict(num_hidden_layers=3, hidden_size=84, num_attention_heads=12, num_key_value_heads=3,
                     intermediate_size=64),
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_growth_dimension_is_exact(case, tied):
    model = make(hidden=48, tied=tied)
    grown = expand(model, **CASES[case])
    assert max_logit_error(model, grown) <= TOL
    assert (grown.get_output_embeddings().weight is grown.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("d, d_new", [(64, 96), (48, 80)])
def test_named_non_integer_width_factors(d, d_new):
    for tied in (True, False):
        model = make(hidden=d, tied=tied, seed=d)
        assert max_logit_error(model, expand(model, hidden_size=d_new, num_hidden_layers=3)) <= TOL


def test_identity_block_zeroes_only_what_it_writes():
    """LLaMA Pro's block expansion: the inserted block copies its source and writes nothing."""
    model = make(layers=1)
    grown, mapping = expand(model, num_hidden_layers=2, depth_placement="top", return_mapping=True)
    assert mapping.new_layers == (False, True)
    g, m = grown.state_dict(), model.state_dict()
    for k in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        assert not g[f"model.layers.1.{k}"].any()
    for k in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.gate_proj.weight",
              "input_layernorm.weight"):
        assert torch.equal(g[f"model.layers.1.{k}"], m[f"model.layers.0.{k}"])
    assert max_logit_error(model, grown) == 0.0


def test_copy_depth_is_elle_s_copy_and_not_exact():
    """``depth_init="copy"`` inserts the source block itself (ELLE): a block applied twice is not the
    identity."""
    model = make()
    grown, mapping = expand(model, num_hidden_layers=3, depth_init="copy", depth_sources=[0],
                            return_mapping=True)
    g = grown.state_dict()
    pairs = [(v, g[k.replace("layers.0.", "layers.1.")]) for k, v in g.items() if "layers.0." in k]
    assert len(pairs) == 9 and all(torch.equal(a, b) for a, b in pairs)
    assert not any(p.fresh_state for p in mapping.plans.values())
    err = max_logit_error(model, grown)
    assert TOL < err < float("inf")


@torch.no_grad()
def test_old_entries_are_the_plans_gather_and_added_ones_start_as_documented():
    """Whatever shortcut builds a parameter, its old entries are what the plan gathers; added read entries are
    random, added write entries zero, added gains sqrt(d/d')."""
    model = make(hidden=32)
    grown, mapping = expand(model, hidden_size=54, num_attention_heads=6, num_key_value_heads=3,
                            intermediate_size=52, num_hidden_layers=3, return_mapping=True)
    old = dict(model.named_parameters())
    s = (32 / 54) ** 0.5
    for name, p in grown.named_parameters():
        plan = mapping.plans[name]
        ref = gather_value(plan, old[plan.source], p.shape)
        if plan.fill is not None:
            assert not p.any(), name
            continue
        added = unit_mask(plan, p.shape)
        assert torch.equal(p[~added], ref[~added]), name
        if not added.any():
            continue
        if "norm" in name:
            assert torch.allclose(p[added], torch.full_like(p[added], s)), name
        elif any(k in name for k in ("o_proj", "down_proj", "embed_tokens")):
            assert not p[added].any(), name
        else:
            assert float(p[added].std()) == pytest.approx(model.config.initializer_range, rel=0.3), name
    assert torch.allclose(grown.model.norm.weight[:32], model.model.norm.weight * s)


def test_query_heads_keep_reading_their_kv_head():
    """4 query heads on 2 KV heads grown to 6 on 2: old head i goes to (i // 2) * 3 + i % 2."""
    model = make(hidden=24, heads=4, kv=2, head=8)
    grown = expand(model, num_attention_heads=6)
    q_old = model.model.layers[0].self_attn.q_proj.weight.view(4, 8, -1)
    q_new = grown.model.layers[0].self_attn.q_proj.weight.view(6, 8, -1)
    o_new = grown.model.layers[0].self_attn.o_proj.weight.view(-1, 6, 8)
    for i, slot in enumerate([0, 1, 3, 4]):
        assert torch.equal(q_new[slot], q_old[i])
    assert not o_new[:, [2, 5]].any()
    assert max_logit_error(model, grown) <= TOL


# -------------------------------------------------------------------------------------------- purity and I/O

def test_input_model_rng_and_mode_untouched_and_storage_own():
    model = make(bias=True).train()
    before = state(model)
    rng = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    grown = expand(model, num_hidden_layers=3, hidden_size=40, num_attention_heads=8, intermediate_size=48,
                   noise_std=0.01, seed=3)
    assert torch.equal(rng, torch.random.get_rng_state()) and torch.get_num_threads() == threads
    assert model.training and grown.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    old_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in old_ptrs for p in grown.parameters())


def test_same_seed_same_model_and_dtype_kept():
    model = make()
    kw = dict(num_hidden_layers=3, hidden_size=40, intermediate_size=48, noise_std=0.01)
    a, b, c = expand(model, seed=1, **kw), expand(model, seed=1, **kw), expand(model, seed=2, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    half = expand(make().to(torch.bfloat16), hidden_size=40)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_pretrained_roundtrip(tied, tmp_path):
    model = make(tied=tied)
    grown = expand(model, num_hidden_layers=3, hidden_size=42, num_attention_heads=6, num_key_value_heads=3,
                   intermediate_size=50)
    grown.save_pretrained(tmp_path)
    back = LlamaForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert model_sizes(back) == model_sizes(grown)
    assert back.config.head_dim == 8 and back.config.rms_norm_eps == grown.config.rms_norm_eps
    assert (back.get_output_embeddings().weight is back.get_input_embeddings().weight) == tied
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in grown.state_dict().items())
    assert max_logit_error(grown, back) == 0.0
    assert max_logit_error(model, back) <= TOL


# ---------------------------------------------------------------------------------------------- other models

def test_mistral():
    model = make("mistral", tied=False)
    grown = expand(model, num_hidden_layers=3, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                   intermediate_size=60)
    assert isinstance(grown, MistralForCausalLM) and model_sizes(grown)["num_key_value_heads"] == 3
    assert max_logit_error(model, grown) <= TOL


def test_qwen2_with_qkv_biases_and_layer_types(tmp_path):
    """Qwen2 has q/k/v biases (perturbed here) and one attention type per layer, which grows with depth;
    its config has no head_dim of its own, so the grown one must carry it through a save and load."""
    model = make("qwen2", tied=True)
    assert model.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    grown = expand(model, num_hidden_layers=4, hidden_size=42, num_attention_heads=6, num_key_value_heads=3,
                   intermediate_size=45)
    assert isinstance(grown, Qwen2ForCausalLM) and len(grown.config.layer_types) == 4
    assert max_logit_error(model, grown) <= TOL
    grown.save_pretrained(tmp_path)
    back = Qwen2ForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert back.config.head_dim == 8 and max_logit_error(grown, back) == 0.0


# ---------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("kw, match", [
    (dict(num_hidden_layers=1), "shrink"),
    (dict(hidden_size=31), "shrink"),
    (dict(num_attention_heads=2, num_key_value_heads=1), "shrink"),
    (dict(num_key_value_heads=1), "shrink"),
    (dict(intermediate_size=39), "shrink"),
    (dict(head_dim=16), "head size"),
    (dict(head_dim=16, hidden_size=64), "head size"),
    (dict(hidden_size=34), "cannot hold the grown sizes.*not a multiple of the number of attention heads"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "not a multiple"),
    (dict(num_key_value_heads=4), "grouping"),
    (dict(num_attention_heads=8, num_key_value_heads=8), "grouping"),
    (dict(depth_init="zero"), "depth_init"),
    (dict(depth_placement="bottom"), "depth_placement"),
    (dict(noise_std=-1.0), "noise_std"),
    (dict(hidden_size=40.0), "positive int"),
    (dict(num_hidden_layers=3, depth_sources=[5]), "depth_sources"),
])
def test_impossible_targets_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        expand(make(heads=4, kv=2, head=8), **kw)


def test_restating_the_head_size_is_fine():
    model = make()
    assert max_logit_error(model, expand(model, head_dim=8, hidden_size=40)) <= TOL


@pytest.mark.parametrize("cls", [LlamaModel, LlamaForSequenceClassification])
def test_unsupported_models_raise_listing_the_supported_ones(cls):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=16)
    listed = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    with pytest.raises(ValueError, match=f"{cls.__name__}.*{listed}"):
        expand(cls(cfg), hidden_size=32)


def test_kv_heads_are_refused_for_gpt2():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="Llama-family"):
        expand(gpt2, num_key_value_heads=2)
    assert "num_key_value_heads" not in model_sizes(gpt2)


# ---------------------------------------------------------------------------------------------- noise, masks

def test_noise_touches_only_copied_entries_and_growth_stays_exact():
    """ELLE's noise for the zero-write construction: only the entries copied into an inserted block (its read
    weights and gains); added units are random already and zero writes are never noised."""
    model = make()
    kw = dict(num_hidden_layers=4, hidden_size=42, num_attention_heads=6, num_key_value_heads=3, seed=5)
    clean, mapping = expand(model, return_mapping=True, **kw)
    noisy = expand(model, noise_std=0.05, **kw)
    assert max_logit_error(model, noisy) <= TOL
    noisy_params = dict(noisy.named_parameters())
    touched = 0
    for name, p in clean.named_parameters():
        plan = mapping.plans[name]
        changed = noisy_params[name] != p
        allowed = unit_mask(plan, p.shape).logical_not() if plan.new_layer and plan.fill is None else None
        if allowed is None:
            assert not changed.any(), name
        else:
            assert not (changed & ~allowed).any() and changed.any(), name
            touched += 1
    assert touched == 2 * 7  # two inserted blocks: q, k, v, gate, up and two gains each


def test_new_entry_masks_mark_what_growth_added_and_can_freeze_the_rest():
    """LLaMA Pro's recipe (``grow.train: new``): train only what growth added. Inserted blocks are all new;
    in old blocks, the added units and residual dimensions; the rest are old entries (moved or rescaled)."""
    model = make(layers=2)
    grown, mapping = expand(model, num_hidden_layers=3, hidden_size=42, num_attention_heads=6,
                            num_key_value_heads=3, intermediate_size=48, depth_sources=[1],
                            return_mapping=True)
    masks = new_entry_masks(grown, mapping)
    assert set(masks) == {n for n, _ in grown.named_parameters()}
    assert all(m.all() for n, m in masks.items() if n.startswith("model.layers.2."))
    q = masks["model.layers.0.self_attn.q_proj.weight"]  # 6 heads x 8 rows (heads 4 and 5 new), 42 columns
    assert q.shape == (48, 42) and not q[:32, :32].any() and q[:, 32:].all() and q[32:].all()
    assert masks["model.norm.weight"].tolist() == [False] * 32 + [True] * 10
    assert not masks["model.layers.0.mlp.down_proj.weight"][:32, :40].any()
    assert masks["model.layers.0.mlp.down_proj.weight"][:, 40:].all()
    # freezing the old entries: a few steps change only the added ones
    before = {n: p.detach().clone() for n, p in grown.named_parameters()}
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    grown.train()
    for step in range(3):
        opt.zero_grad()
        grown(input_ids=ids(seed=step), labels=ids(seed=step)).loss.backward()
        for n, p in grown.named_parameters():
            p.grad.mul_(masks[n])
        opt.step()
    for n, p in grown.named_parameters():
        assert torch.equal(p[~masks[n]], before[n][~masks[n]]), n
    assert any(not torch.equal(p, before[n]) for n, p in grown.named_parameters())


# ---------------------------------------------------------------------------------------------- optimizer

def test_adamw_state_follows_the_plan():
    """After one AdamW step at lr 0 (m = (1-b1) g, v = (1-b2) g^2), the carried moments of every old entry
    equal those of the grown model's own gradient on the same batch; added entries and inserted blocks start
    at zero.
    The RMSNorm gains, multiplied by s = sqrt(d/d'), act through s g * n / s: their gradient is the old one
    divided by s, so the first moment is divided by s and the second by s^2 (carried, not reset)."""
    model = make(layers=2, bias=True).train()
    x = ids(4, 12)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    grown, mapping = expand(model, num_hidden_layers=3, hidden_size=42, num_attention_heads=6,
                            num_key_value_heads=3, intermediate_size=50, return_mapping=True, seed=7)
    new_opt = torch.optim.AdamW(grown.parameters(), lr=0.0)
    remap_optimizer_state(model, grown, opt, new_opt, mapping)
    grown.zero_grad()
    grown(input_ids=x, labels=x).loss.backward()
    b1, b2 = new_opt.defaults["betas"]
    masks = new_entry_masks(grown, mapping)
    checked = 0
    for name, p in grown.named_parameters():
        st_ = new_opt.state[p]
        m, v = st_["exp_avg"], st_["exp_avg_sq"]
        assert m.shape == p.shape and v.shape == p.shape
        if mapping.plans[name].fresh_state:
            assert int(st_["step"]) == 0 and not m.any() and not v.any(), name
            continue
        assert int(st_["step"]) == 1
        old, added = ~masks[name], masks[name]
        assert not m[added].any() and not v[added].any(), name
        g = p.grad[old]
        assert (m[old] - (1 - b1) * g).abs().max() <= 1e-8 + 1e-4 * g.abs().max(), name
        assert (v[old] - (1 - b2) * g * g).abs().max() <= 1e-14 + 1e-4 * (g * g).max(), name
        checked += 1
    assert checked == sum(not p.fresh_state for p in mapping.plans.values()) > 10
    s = (32 / 42) ** 0.5
    gain_old = opt.state[model.model.norm.weight]["exp_avg"]
    assert torch.allclose(new_opt.state[grown.model.norm.weight]["exp_avg"][:32], gain_old / s)
    # training goes on from the carried state
    for group in new_opt.param_groups:
        group["lr"] = 1e-3
    before = grown(input_ids=x, labels=x).loss.item()
    for _ in range(3):
        new_opt.zero_grad()
        grown(input_ids=x, labels=x).loss.backward()
        new_opt.step()
    assert grown(input_ids=x, labels=x).loss.item() < before
