"""Function-preserving growth (ray_lifelong.growth): exactness, shapes, purity, I/O, optimizer state.

Tiny random models with perturbed parameters (LayerNorm affines and biases far from their
1/0 init, so that e.g. the BERT identity construction is really exercised). All CPU, float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
)
from transformers.utils import logging as hf_logging

from ray_lifelong.config import TrainConfig
from ray_lifelong.growth import (
    GrowthMapping,
    expand,
    logit_errors,
    max_logit_error,
    model_sizes,
    remap_optimizer_state,
)
from ray_lifelong.growth.plan import noise_mask
from ray_lifelong.stage.step import build_optimizer

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

VOCAB = 61
ARCHS = ("bert", "gpt2", "roberta")
TOL_WIDTH = 1e-4
TOL_DEPTH = {"bert": 1e-4, "gpt2": 1e-5, "roberta": 1e-4}
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(arch: str, *, hidden: int = 16, layers: int = 2, heads: int = 2, ffn: int = 24, tied: bool = True,
         seed: int = 0, scale: float = 0.3):
    """A tiny model, dropout off, every parameter perturbed by N(0, scale^2) to look 'trained'."""
    if arch in ("bert", "roberta"):
        # RoBERTa: BERT's layer under ``roberta.``, positions numbered after its padding index (1)
        config, cls = (BertConfig, BertForMaskedLM) if arch == "bert" else (RobertaConfig, RobertaForMaskedLM)
        cfg = config(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, tie_word_embeddings=tied,
                     pad_token_id=0 if arch == "bert" else 1)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn,
                         n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                         eos_token_id=0, tie_word_embeddings=tied)
        cls = GPT2LMHeadModel
    torch.manual_seed(seed)
    model = cls(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def ids(n: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def decay_groups(model, lr: float = 1e-3, wd: float = 0.01) -> torch.optim.AdamW:
    """The stage's own optimizer grouping (no decay on biases and LayerNorm weights)."""
    return build_optimizer(model, lr, TrainConfig(weight_decay=wd))


# ---------------------------------------------------------------------------------------------- exactness

@FEW
@given(arch=st.sampled_from(ARCHS), layers=st.integers(1, 3), extra=st.integers(1, 4),
       placement=st.sampled_from(["interleave", "top"]), seed=st.integers(0, 10_000))
def test_identity_depth_is_exact(arch, layers, extra, placement, seed):
    model = make(arch, layers=layers, seed=seed)
    grown = expand(model, num_hidden_layers=layers + extra, depth_init="identity", depth_placement=placement,
                   seed=seed)
    assert model_sizes(grown)["num_hidden_layers"] == layers + extra
    assert max_logit_error(model, grown, seed=seed) <= TOL_DEPTH[arch]


@FEW
@given(arch=st.sampled_from(ARCHS), head=st.sampled_from([4, 8]), heads=st.integers(1, 3),
       factor=st.integers(2, 3), ffn=st.integers(8, 24), ffn_extra=st.integers(0, 20),
       extra=st.integers(0, 2), seed=st.integers(0, 10_000))
def test_integer_width_growth_is_exact(arch, head, heads, factor, ffn, ffn_extra, extra, seed):
    """Integer factor on hidden/heads (LayerNorm statistics kept), any FFN growth, plus identity depth."""
    model = make(arch, hidden=head * heads, heads=heads, ffn=ffn, seed=seed)
    grown = expand(model, hidden_size=head * heads * factor, intermediate_size=ffn + ffn_extra,
                   num_hidden_layers=2 + extra, seed=seed)
    sizes = model_sizes(grown)
    assert sizes["num_attention_heads"] == heads * factor
    assert sizes["hidden_size"] // sizes["num_attention_heads"] == head
    assert max_logit_error(model, grown, seed=seed) <= TOL_WIDTH


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kw", [dict(intermediate_size=37), dict(num_attention_heads=4),
                                dict(hidden_size=32, intermediate_size=48)],
                         ids=["ffn", "heads", "hidden+ffn"])
def test_each_width_dimension_alone_is_exact(arch, kw):
    model = make(arch)
    assert max_logit_error(model, expand(model, **kw)) <= TOL_WIDTH


@pytest.mark.parametrize("arch", ARCHS)
def test_untied_output_layer_is_exact(arch):
    """Untied: the output matrix takes the division and the last LayerNorm is plainly copied."""
    model = make(arch, tied=False)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    grown = expand(model, hidden_size=32, num_hidden_layers=3)
    assert grown.get_output_embeddings().weight is not grown.get_input_embeddings().weight
    assert max_logit_error(model, grown) <= TOL_WIDTH


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_output_stays_tied_and_undivided(arch):
    model = make(arch)
    grown = expand(model, hidden_size=32)
    emb = grown.get_input_embeddings().weight
    assert grown.get_output_embeddings().weight is emb
    # the input side is a plain copy: the old columns are untouched (no double division: the bug of ELLE's
    # official width code)
    assert torch.equal(emb[:, :16], model.get_input_embeddings().weight)


def test_bert_identity_layer_reproduces_the_hidden_state_below_it():
    """The post-LN construction, layer by layer: the new layer outputs what its source output."""
    model = make("bert", layers=2)
    grown, mapping = expand(model, num_hidden_layers=3, depth_sources=[0], return_mapping=True)
    assert mapping.layer_sources == (0, 0, 1) and mapping.new_layers == (False, True, False)
    x = ids()
    with torch.no_grad():
        old = model(input_ids=x, output_hidden_states=True).hidden_states  # emb, after 0, after 1
        new = grown(input_ids=x, output_hidden_states=True).hidden_states  # emb, after 0', after new, after 1
    ln = "bert.encoder.layer.{}.output.LayerNorm.{}"
    g, m = grown.state_dict(), model.state_dict()
    # the layer below now ends with a plain normalisation ...
    assert torch.equal(g[ln.format(0, "weight")], torch.ones(16))
    assert torch.equal(g[ln.format(0, "bias")], torch.zeros(16))
    h = new[1]
    assert h.mean(-1).abs().max() < 1e-5 and (h.var(-1, unbiased=False) - 1).abs().max() < 1e-4
    # ... its affine moved into the new layer's last LayerNorm, whose output is the old hidden state
    assert torch.equal(g[ln.format(1, "weight")], m[ln.format(0, "weight")])
    assert torch.equal(g[ln.format(1, "bias")], m[ln.format(0, "bias")])
    assert (new[2] - old[1]).abs().max() <= 1e-5
    assert (new[3] - old[2]).abs().max() <= 1e-4


def test_bert_identity_chain_and_top_placement():
    """Several new layers in a row pass the LayerNorm affine along; only the last carries it."""
    model = make("bert", layers=1)
    grown, mapping = expand(model, num_hidden_layers=4, depth_placement="top", return_mapping=True)
    assert mapping.new_layers == (False, True, True, True)
    m, g = model.state_dict(), grown.state_dict()
    key = "bert.encoder.layer.{}.output.LayerNorm.weight"
    assert all(torch.equal(g[key.format(i)], torch.ones(16)) for i in range(3))
    assert torch.equal(g[key.format(3)], m[key.format(0)])
    assert max_logit_error(model, grown) <= TOL_DEPTH["bert"]


def test_gpt2_identity_layer_zeroes_only_output_projections():
    model = make("gpt2", layers=1)
    grown = expand(model, num_hidden_layers=2, depth_placement="top")
    g, m = grown.state_dict(), model.state_dict()
    for k in ("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
        assert not g[f"transformer.h.1.{k}"].any()
    for k in ("ln_1.weight", "attn.c_attn.weight", "mlp.c_fc.weight"):
        assert torch.equal(g[f"transformer.h.1.{k}"], m[f"transformer.h.0.{k}"])
    assert max_logit_error(model, grown) == 0.0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scale", [0.0, 0.3], ids=["hf-init", "perturbed"])
def test_approximate_operators_report_their_error(arch, scale, capsys):
    """copy depth and 384->512-like (4/3) width growth are approximate: measured and printed, not asserted 0.

    ``hf-init`` is the plain HF initialisation (std 0.02, LayerNorm 1/0); ``perturbed`` adds N(0, 0.3^2) to
    every parameter, a harsher stand-in for a trained model.
    """
    model = make(arch, hidden=24, heads=3, ffn=48, layers=2, scale=scale)
    grown = {
        "identity_depth": expand(model, num_hidden_layers=3),
        "copy_depth": expand(model, num_hidden_layers=3, depth_init="copy"),
        "integer_width": expand(model, hidden_size=48, intermediate_size=96),
        "width_4/3": expand(model, hidden_size=32, intermediate_size=64),
        "elle_step_noise": expand(model, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  depth_init="copy", noise_std=0.01),
    }
    errors = {k: logit_errors(model, g) for k, g in grown.items()}
    with capsys.disabled():
        print(f"\n[growth] {arch} {'perturbed' if scale else 'hf-init'} (logit std "
              f"{errors['copy_depth']['ref_std']:.2f}): "
              + ", ".join(f"{k} max|dlogit|={v['max_abs']:.2e} kl={v['kl']:.1e}" for k, v in errors.items()))
    assert errors["identity_depth"]["max_abs"] <= TOL_DEPTH[arch]
    assert errors["integer_width"]["max_abs"] <= TOL_WIDTH
    assert errors["copy_depth"]["max_abs"] > TOL_DEPTH[arch] and errors["width_4/3"]["max_abs"] > TOL_WIDTH
    assert all(math.isfinite(v["max_abs"]) for v in errors.values())


# ---------------------------------------------------------------------------------------------- structure

@FEW
@given(arch=st.sampled_from(ARCHS), tied=st.booleans(), layers=st.integers(1, 2), extra=st.integers(0, 2),
       heads=st.integers(1, 2), more_heads=st.integers(0, 2), ffn_extra=st.integers(0, 9),
       init=st.sampled_from(["identity", "copy"]), seed=st.integers(0, 100))
def test_shapes_and_parameter_count_match_a_fresh_model(arch, tied, layers, extra, heads, more_heads,
                                                        ffn_extra, init, seed):
    model = make(arch, hidden=8 * heads, heads=heads, layers=layers, tied=tied, seed=seed)
    grown = expand(model, num_attention_heads=heads + more_heads, num_hidden_layers=layers + extra,
                   intermediate_size=24 + ffn_extra, depth_init=init, seed=seed)
    assert type(grown) is type(model)
    # the reference is built from the target sizes directly, not from the grown model's config
    ref = make(arch, hidden=8 * (heads + more_heads), heads=heads + more_heads, layers=layers + extra,
               ffn=24 + ffn_extra, tied=tied)
    shapes = {k: v.shape for k, v in grown.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in grown.parameters()) == sum(p.numel() for p in ref.parameters())
    h = heads + more_heads
    assert model_sizes(grown) == {"num_hidden_layers": layers + extra, "hidden_size": 8 * h,
                                  "num_attention_heads": h, "intermediate_size": 24 + ffn_extra}


def test_gpt2_default_ffn_size_is_kept_unless_asked():
    """GPT-2's ``n_inner=None`` means 4 x hidden: growing the hidden size alone keeps the old FFN size."""
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_inner=None, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    kept = expand(model, hidden_size=32)
    assert model_sizes(kept)["intermediate_size"] == 64 and kept.config.n_inner == 64
    scaled = expand(model, hidden_size=32, intermediate_size=128)
    assert scaled.config.n_inner is None and model_sizes(scaled)["intermediate_size"] == 128
    assert max_logit_error(model, kept) <= TOL_WIDTH and max_logit_error(model, scaled) <= TOL_WIDTH


@pytest.mark.parametrize("arch", ARCHS)
def test_dtype_and_requires_grad_are_kept(arch):
    model = make(arch).to(torch.bfloat16)
    model.get_input_embeddings().weight.requires_grad_(False)
    grown = expand(model, hidden_size=32, num_hidden_layers=3)
    assert {p.dtype for p in grown.parameters()} == {torch.bfloat16}
    assert not grown.get_input_embeddings().weight.requires_grad
    assert sum(p.requires_grad for p in grown.parameters()) == len(list(grown.parameters())) - 1


@pytest.mark.parametrize("arch", ARCHS)
def test_input_model_and_global_rng_untouched(arch):
    model = make(arch).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    grown = expand(model, hidden_size=32, num_hidden_layers=4, intermediate_size=40, noise_std=0.01, seed=3)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert model.training and grown.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.data_ptr() == q.data_ptr() for p in grown.parameters() for q in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_model_different_seed_different_mapping(arch):
    model = make(arch)
    kw = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=3, depth_init="copy")
    a, b, c = expand(model, seed=1, **kw), expand(model, seed=1, **kw), expand(model, seed=2, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_roundtrip(arch, tmp_path):
    model = make(arch)
    grown = expand(model, hidden_size=32, num_hidden_layers=3, intermediate_size=40)
    grown.save_pretrained(tmp_path)
    back = type(grown).from_pretrained(tmp_path, local_files_only=True).eval()
    assert model_sizes(back) == model_sizes(grown)
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    assert max_logit_error(grown, back) == 0.0
    assert max_logit_error(model, back) <= TOL_WIDTH


@pytest.mark.parametrize("arch", ARCHS)
def test_noise_touches_only_new_entries(arch):
    model = make(arch)
    kw = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=3, depth_init="copy", seed=5)
    clean, mapping = expand(model, return_mapping=True, **kw)
    noisy = expand(model, noise_std=0.01, **kw)
    noisy_params = dict(noisy.named_parameters())
    for name, p in clean.named_parameters():
        changed = (noisy_params[name] - p).abs() > 0
        allowed = noise_mask(mapping.plans[name], p.shape)
        assert not (changed & ~allowed).any(), name
        if allowed.any():
            assert changed.any(), name


@pytest.mark.parametrize("kw, match", [
    (dict(num_hidden_layers=1), "shrink"),
    (dict(intermediate_size=8), "shrink"),
    (dict(hidden_size=8), "shrink"),
    (dict(hidden_size=30), "multiple of the head size"),
    (dict(hidden_size=30, num_attention_heads=4), "not divisible"),
    (dict(hidden_size=32, num_attention_heads=2), "head size"),
    (dict(num_attention_heads=4, hidden_size=24), "head size"),
    (dict(depth_init="zero"), "depth_init"),
    (dict(depth_placement="bottom"), "depth_placement"),
    (dict(noise_std=-1.0), "noise_std"),
    (dict(num_hidden_layers=2.5), "positive int"),
    (dict(num_hidden_layers=3, depth_sources=[5]), "depth_sources"),
])
@pytest.mark.parametrize("arch", ARCHS)
def test_impossible_targets_raise(arch, kw, match):
    with pytest.raises(ValueError, match=match):
        expand(make(arch), **kw)


def test_unknown_architecture_raises():
    from transformers import BertModel

    with pytest.raises(ValueError, match="BertModel"):
        expand(BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=16)), hidden_size=32)


# ---------------------------------------------------------------------------------------------- optimizer

def _loss(model, x):
    return model(input_ids=x, labels=x).loss


@pytest.mark.parametrize("arch", ARCHS)
def test_carried_moments_are_the_grown_models_gradient_moments(arch):
    """One AdamW step at lr 0 stores m = (1-b1) g and v = (1-b2) g^2; after growth the remapped moments
    must equal those of the grown model's own gradient on the same batch (integer width + identity depth,
    where growth is exact)."""
    model = make(arch, layers=2, ffn=24).train()
    x = ids(4, 12)
    opt = decay_groups(model, lr=0.0)
    _loss(model, x).backward()
    opt.step()
    grown, mapping = expand(model, hidden_size=32, intermediate_size=36, num_hidden_layers=3,
                            return_mapping=True, seed=7)
    new_opt = decay_groups(grown, lr=0.0)
    remap_optimizer_state(model, grown, opt, new_opt, mapping)
    assert {id(p) for g in new_opt.param_groups for p in g["params"]} == {id(p) for p in grown.parameters()}
    grown.zero_grad()
    _loss(grown, x).backward()
    b1, b2 = new_opt.defaults["betas"]
    names = {id(p): n for n, p in grown.named_parameters()}
    checked = 0
    for p, state in new_opt.state.items():
        plan = mapping.plans[names[id(p)]]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        if plan.fresh_state:
            assert int(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
            continue
        assert int(state["step"]) == 1
        g = p.grad
        m_ref, v_ref = (1 - b1) * g, (1 - b2) * g * g
        assert (state["exp_avg"] - m_ref).abs().max() <= 1e-7 + 1e-3 * m_ref.abs().max(), names[id(p)]
        assert (state["exp_avg_sq"] - v_ref).abs().max() <= 1e-12 + 1e-3 * v_ref.abs().max(), names[id(p)]
        checked += 1
    assert checked > len(new_opt.state) // 2
    # and training continues from the carried state
    for group in new_opt.param_groups:
        group["lr"] = 1e-3
    before = _loss(grown, x).item()
    for _ in range(3):
        new_opt.zero_grad()
        _loss(grown, x).backward()
        new_opt.step()
    assert all(int(s["step"]) in (3, 4) for s in new_opt.state.values())
    assert _loss(grown, x).item() < before


@pytest.mark.parametrize("arch", ARCHS)
def test_remap_after_real_training_and_copy_growth(arch):
    """Carried state after a few real steps, approximate growth: shapes, groups and steps are consistent,
    copied layers carry their source's moments, and training goes on."""
    model = make(arch).train()
    opt = decay_groups(model, lr=1e-3)
    for s in range(3):
        opt.zero_grad()
        _loss(model, ids(seed=s)).backward()
        opt.step()
    old_named = dict(model.named_parameters())
    # depth only, copy init: every parameter of a copied layer has exactly its source's moments
    deep, mapping = expand(model, num_hidden_layers=3, depth_init="copy", depth_sources=[1],
                           return_mapping=True)
    deep_opt = decay_groups(deep)
    remap_optimizer_state(model, deep, opt, deep_opt, mapping)
    for name, p in deep.named_parameters():
        st, old = deep_opt.state[p], opt.state[old_named[mapping.plans[name].source]]
        assert all(torch.equal(st[k], old[k]) for k in ("step", "exp_avg", "exp_avg_sq")), name
    # width and depth, with noise: moments shrink by the per-unit gradient scale, never grow
    grown, mapping = expand(model, hidden_size=24, intermediate_size=30, num_hidden_layers=3,
                            depth_init="copy", noise_std=0.01, return_mapping=True)
    assert isinstance(mapping, GrowthMapping)
    new_opt = decay_groups(grown)
    remap_optimizer_state(model, grown, opt, new_opt, mapping)
    assert set(map(id, new_opt.state)) == {id(p) for p in grown.parameters()}
    for name, p in grown.named_parameters():
        st = new_opt.state[p]
        old = opt.state[old_named[mapping.plans[name].source]]
        assert int(st["step"]) == 3 and st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        assert (st["exp_avg_sq"] >= 0).all()
        assert st["exp_avg"].abs().max() <= old["exp_avg"].abs().max() + 1e-12
    new_opt.zero_grad()
    _loss(grown, ids()).backward()
    new_opt.step()


def test_remap_rejects_a_mismatched_mapping():
    model = make("gpt2")
    opt = decay_groups(model)
    _, mapping = expand(model, hidden_size=32, return_mapping=True)
    other = expand(model, num_hidden_layers=3)
    with pytest.raises(ValueError, match="mapping"):
        remap_optimizer_state(model, other, opt, decay_groups(other), mapping)


# ---------------------------------------------------------------------------------------------- recovery

@pytest.mark.parametrize("arch", ARCHS)
def test_function_recovering_warmup_brings_the_loss_back(arch):
    """ELLE's function-recovering warmup in miniature: approximate growth (copy depth, 4/3 width, noise)
    raises the loss
    on the old data; a few steps on that data bring it back near the pre-growth loss."""
    model = make(arch, hidden=24, heads=3, ffn=48, scale=0.0).train()
    data = [ids(8, 16, seed=s) for s in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        opt.zero_grad()
        _loss(model, data[step % 2]).backward()
        opt.step()
    with torch.no_grad():
        base = sum(_loss(model.eval(), x).item() for x in data) / 2
    grown = expand(model, hidden_size=32, intermediate_size=64, num_hidden_layers=3, depth_init="copy",
                   noise_std=0.01).train()
    with torch.no_grad():
        jumped = sum(_loss(grown.eval(), x).item() for x in data) / 2
    opt = torch.optim.AdamW(grown.train().parameters(), lr=1e-3)
    for step in range(10):
        opt.zero_grad()
        _loss(grown, data[step % 2]).backward()
        opt.step()
    with torch.no_grad():
        recovered = sum(_loss(grown.eval(), x).item() for x in data) / 2
    assert jumped > base
    assert recovered < jumped and recovered <= base + 0.25 * (jumped - base) + 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("width", [False, True])
def test_grown_parameters_own_their_storage(arch, width):
    """Regression: depth-only growth once returned the source layer's tensors themselves, so an inserted
    layer stayed tied to its source (and to the input model) and the checkpoint could not be saved."""
    model = make(arch, layers=3, seed=1)
    hidden = model.config.hidden_size * (2 if width else 1)
    grown = expand(model, num_hidden_layers=4, hidden_size=hidden, depth_init="identity")
    old = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, str] = {}
    for name, p in grown.named_parameters(remove_duplicate=False):
        ptr = p.data_ptr()
        assert ptr not in old, f"{name} shares storage with the input model"
        if ptr in seen:  # only HF's own ties: output embedding = input embedding, decoder bias = bias
            assert {seen[ptr], name} in (
                {"transformer.wte.weight", "lm_head.weight"},
                {"bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"},
                {"cls.predictions.bias", "cls.predictions.decoder.bias"},
                {"roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight"},
                {"lm_head.bias", "lm_head.decoder.bias"},
            ), (seen[ptr], name)
        seen[ptr] = name


def _ffn_twins(model) -> int:
    """How many first-FFN units of layer 0 have a twin (the same fan-in weights and bias, to rounding)."""
    if not isinstance(model, GPT2LMHeadModel):  # BERT's layer (RoBERTa's too)
        lin = model.base_model.encoder.layer[0].intermediate.dense
        fan_in = torch.cat([lin.weight, lin.bias[:, None]], 1)
    else:
        conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight is (in, out)
        fan_in = torch.cat([conv.weight.T, conv.bias[:, None]], 1)
    dist = torch.cdist(fan_in.detach(), fan_in.detach(), compute_mode="donot_use_mm_for_euclid_dist")
    dist.fill_diagonal_(float("inf"))
    return int((dist.min(1).values <= 1e-6).sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_without_noise_a_copied_unit_never_leaves_its_original(arch):
    """Width growth copies units and divides what reads them, so a copy and its original get the same gradient
    at every step: with no noise they stay tied for ever (dropout on, as in training, does not untie FFN
    units)
    and the grown model has the small one's capacity. ELLE's noise (the stage's default, 0.01) unties them."""
    from ray_lifelong.config import GrowthConfig

    model = make(arch, hidden=16, heads=2, ffn=24, scale=0.0)
    model.config.hidden_dropout_prob = model.config.resid_pdrop = 0.1  # the training default
    twins = {}
    for noise in (0.0, GrowthConfig().noise_std):
        grown = expand(model, hidden_size=32, intermediate_size=48, noise_std=noise, seed=1).train()
        copied = _ffn_twins(expand(model, hidden_size=32, intermediate_size=48, noise_std=0.0, seed=1))
        opt = decay_groups(grown, lr=3e-3)
        for step in range(5):
            opt.zero_grad()
            _loss(grown, ids(4, 12, seed=step)).backward()
            opt.step()
        twins[noise] = _ffn_twins(grown)
    assert copied >= 24  # the 24 new units are copies (of originals drawn at random, some more than once)
    assert twins[0.0] == copied  # after training, every copy still equals its original
    assert twins[GrowthConfig().noise_std] == 0
