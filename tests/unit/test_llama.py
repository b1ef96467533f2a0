"""``model.arch: llama`` through the system: config checks, building, the LM objective, loading, growth at a
stage boundary, FLOPs, the downstream classifier and the shipped config. Tiny models, CPU, no Ray."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.utils import logging as hf_logging

from ray_lifelong.config import ConfigError, load_config
from ray_lifelong.config.plan import GrowthSizeError, grown_sizes, stage_model_sizes, stage_plans
from ray_lifelong.config.schema import GrowthConfig, ModelConfig, TrainConfig
from ray_lifelong.data.packing import IGNORE_INDEX
from ray_lifelong.flops import flops_sizes, forward_flops_per_sequence, non_embedding_params, sequence_flops
from ray_lifelong.growth import model_sizes
from ray_lifelong.models.arch import LLAMA_FAMILY, arch_of_model_type, is_causal
from ray_lifelong.models.build import (
    LMObjective,
    build_model,
    count_parameters,
    lm_loss,
    load_classifier,
    load_model,
    model_arch,
    padded_vocab,
    position_rows,
    saved_model_arch,
)
from tests.conftest import REPO

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

ELLE_LLAMA = REPO / "configs/elle_llama.yaml"
VOCAB, EOS = 50, 0


def tiny(**kw) -> ModelConfig:
    base = dict(arch="llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=48,
                max_position_embeddings=64, dropout=0.0, vocab_multiple=8)
    return ModelConfig(**{**base, **kw})


def build(cfg: ModelConfig | None = None, seed: int = 0):
    return build_model(cfg or tiny(), VOCAB, pad_id=None, eos_id=EOS, seed=seed).eval()


# --- building -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie, tied", [(None, False), (False, False), (True, True)])
def test_a_llama_is_built_from_its_sizes_with_grouped_query_attention(tie, tied):
    from transformers import LlamaForCausalLM

    m = build(tiny(tie_embeddings=tie, rope_theta=500.0, dropout=0.1))
    c = m.config
    assert isinstance(m, LlamaForCausalLM) and model_arch(m) == "llama"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.max_position_embeddings) == (2, 32, 4, 2, 48, 64)
    assert c.vocab_size == 56  # 50 tokens padded to a multiple of 8
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied == c.tie_word_embeddings
    assert c.bos_token_id == c.eos_token_id == EOS and c.pad_token_id is None
    assert c.attention_dropout == 0.1
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    assert rope["rope_theta"] == 500.0
    layer = m.model.layers[0]
    # K and V are KV heads x head size (2 x 8) wide; Q is every query head
    assert layer.self_attn.k_proj.weight.shape == (16, 32) and layer.self_attn.q_proj.weight.shape == (32, 32)
    assert layer.mlp.gate_proj.weight.shape == (48, 32)


def test_without_num_kv_heads_a_llama_has_one_kv_head_per_query_head():
    m = build(tiny(num_kv_heads=None))
    assert m.config.num_key_value_heads == 4


def test_the_same_seed_builds_the_same_llama():
    a, b = build(seed=3), build(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_llama_is_a_causal_lm_everywhere():
    from ray_lifelong.config.schema import TokenizerConfig
    from ray_lifelong.data.run_tokenizer import tokenizer_kind
    from ray_lifelong.flops import logit_positions
    from ray_lifelong.stage.step import Masker

    assert is_causal("llama") and is_causal("gpt2") and not is_causal("bert")
    with pytest.raises(ValueError, match="unknown architecture"):
        is_causal("t5")
    assert tokenizer_kind(TokenizerConfig(), "llama") == "bpe"
    assert logit_positions("llama", 100, 0.15) == 99.0

    class Tok:
        mask_token_id, all_special_ids = None, [0]

        def __len__(self):
            return VOCAB

    ids = torch.randint(0, VOCAB, (2, 8))
    inputs, labels = Masker(Tok(), 0.15, "llama")(ids, None)
    assert inputs is ids and labels is ids


# --- the LM objective -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_the_objective_gives_hf_s_own_causal_loss(tie):
    m = build(tiny(tie_embeddings=tie))
    ids = torch.randint(0, VOCAB, (3, 10))
    labels = ids.clone()
    labels[0, 4:] = IGNORE_INDEX  # e.g. padding, or positions another objective supervises
    logits, targets = LMObjective(m)(ids, labels)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert logits.shape == (n, 56) and targets.shape == (n,)
    with torch.no_grad():
        want = m(input_ids=ids, labels=labels).loss
    assert float(lm_loss(logits, targets).detach()) == pytest.approx(float(want), abs=1e-5)
    rows = position_rows(labels, "llama")
    assert rows.tolist() == [0] * 3 + [1] * 9 + [2] * 9
    # without labels every next token is a target
    logits, targets = LMObjective(m)(ids)
    assert logits.shape == (27, 56) and torch.equal(targets, ids[:, 1:].reshape(-1))


# --- saving, loading, the llama family ------------------------------------------------------------------


def test_a_saved_llama_loads_back_as_the_same_model(tmp_path):
    m = build()
    m.save_pretrained(tmp_path)
    assert saved_model_arch(str(tmp_path)) == "llama"
    again = load_model(str(tmp_path)).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, again(input_ids=ids).logits)


def test_mistral_and_qwen2_are_of_the_llama_family_because_growth_supports_them(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from ray_lifelong.growth.llama import SUPPORTED

    assert set(LLAMA_FAMILY) == set(SUPPORTED.values()) == {"llama", "mistral", "qwen2"}
    kinds = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "opt", None)
    assert [arch_of_model_type(t) for t in kinds] == ["bert", "bert", "gpt2", "llama", "llama", "llama", None,
                                                      None]
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    MistralForCausalLM(cfg).save_pretrained(tmp_path)
    assert saved_model_arch(str(tmp_path)) == "llama"
    loaded = load_model(str(tmp_path))
    assert isinstance(loaded, MistralForCausalLM) and model_arch(loaded) == "llama"
    ids = torch.randint(0, VOCAB, (2, 6))
    assert LMObjective(loaded)(ids)[0].shape == (10, VOCAB)
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(ValueError, match="model type 'opt'; supported: bert, roberta, gpt2, llama, mistral, "
                                         "qwen2"):
        saved_model_arch(str(opt))


def test_a_teacher_is_matched_to_the_student_by_family(tmp_path):
    from ray_lifelong.distill.teacher import check_teacher_compatible

    class Tok:
        def __len__(self):
            return VOCAB

    build().save_pretrained(tmp_path)
    cfg = check_teacher_compatible(str(tmp_path), Tok(), "llama", rows=padded_vocab(VOCAB, 8))
    # its FLOPs from its saved config.json, as the stage charges a teacher
    assert sequence_flops(cfg, vocab=56, seq_len=16, arch="llama", mlm_probability=0.15, train=False) == \
        sequence_flops(tiny(), vocab=56, seq_len=16, arch="llama", mlm_probability=0.15, train=False)
    with pytest.raises(ValueError, match="does not match the student's architecture 'gpt2'"):
        check_teacher_compatible(str(tmp_path), Tok(), "gpt2", rows=padded_vocab(VOCAB, 8))


# --- config ---------------------------------------------------------------------------------------------


def test_the_shipped_llama_config_validates_and_plans_its_growth():
    cfg = load_config(ELLE_LLAMA)
    assert cfg.model.arch == "llama" and cfg.model.num_kv_heads == 2 and not cfg.model.ties_embeddings()
    grow = cfg.data.domains[1].grow
    assert grow.num_layers and grow.hidden_size and grow.num_kv_heads  # width, depth and KV heads at once
    assert cfg.continual.prompts and cfg.continual.replay.enabled and cfg.continual.frw.steps > 0
    sizes = stage_model_sizes(cfg)
    assert [(s["num_layers"], s["hidden_size"], s["num_heads"], s["num_kv_heads"]) for s in sizes] == [
        (2, 128, 4, 2), (3, 192, 6, 3), (4, 256, 8, 4), (4, 256, 8, 4)]
    assert all(s["hidden_size"] // s["num_heads"] == 32 for s in sizes)  # the head size never changes
    assert [p.frw_steps for p in stage_plans(cfg)] == [0, 10, 10, 0]
    final = load_config(ELLE_LLAMA, ["continual.growth=final"])
    assert (final.model.num_heads, final.model.num_kv_heads, final.model.hidden_size) == (8, 4, 256)
    for overlay in sorted((REPO / "configs" / "methods").glob("*.yaml")):
        load_config(ELLE_LLAMA, [str(overlay)])


@pytest.mark.parametrize("overrides, key", [
    (["model.num_kv_heads=3"], r"model\.num_kv_heads: 3 does not divide model\.num_heads=4"),
    (["model.num_kv_heads=0"], r"model\.num_kv_heads"),
    (["model.rope_theta=0"], r"model\.rope_theta"),
    (["model.arch=gpt2", "model.num_kv_heads=2", "data.domains.1.grow=null", "data.domains.2.grow=null"],
     r"model\.num_kv_heads: grouped-query attention is Llama's"),
    (["model.arch=bert", "model.num_kv_heads=null", "data.domains.1.grow.num_kv_heads=null"],
     r"model\.tie_embeddings: model\.arch=bert is always built tied"),
    # 192 / 4 heads = 48: a different head size
    (["data.domains.1.grow.num_heads=4"],
     r"data\.domains\[1\]\.grow\.hidden_size: .*changes the head size 32"),
    (["data.domains.1.grow.hidden_size=200"], r"data\.domains\[1\]\.grow\.hidden_size: 200 is not a multiple "
                                              r"of the head size 32"),
    (["data.domains.1.grow.num_kv_heads=4"], r"data\.domains\[1\]\.grow\.num_kv_heads: 4 KV heads do not "
                                             r"divide the 6 query heads"),
    # 6 query heads over 6 KV heads would split the pairs that share a KV head now
    (["data.domains.1.grow.num_kv_heads=6"],
     r"data\.domains\[1\]\.grow\.num_kv_heads: .*fewer than the 2 now"),
    # 5 heads cannot keep 2 per KV head, and the current 2 KV heads do not divide 5
    (["data.domains.1.grow.hidden_size=160", "data.domains.1.grow.num_kv_heads=null"],
     r"data\.domains\[1\]\.grow\.num_kv_heads: .*set grow\.num_kv_heads"),
    (["data.domains.1.grow.num_kv_heads=1"], r"data\.domains\[1\]\.grow\.num_kv_heads: growth cannot shrink"),
    (["data.domains.1.grow.num_layers=1"], r"data\.domains\[1\]\.grow\.num_layers: growth cannot shrink"),
])
def test_llama_settings_and_growths_that_cannot_work_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(ELLE_LLAMA, overrides)


def test_kv_heads_are_llama_only_in_a_growth_too():
    with pytest.raises(ConfigError, match=r"data\.domains\[1\]\.grow\.num_kv_heads: grouped-query attention"):
        load_config(REPO / "configs/elle_demo.yaml", ["data.domains.1.grow.num_kv_heads=2"])
    # BERT and GPT-2 may restate what they are
    load_config(REPO / "configs/elle_demo.yaml", ["model.tie_embeddings=true", "model.num_kv_heads=2"])


def test_without_num_kv_heads_growth_keeps_the_kv_heads_or_the_grouping():
    now = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 96}
    same_heads = grown_sizes(now, GrowthConfig(num_layers=4, intermediate_size=128), "llama")
    assert same_heads == {**now, "num_layers": 4, "intermediate_size": 128}
    wider = grown_sizes(now, GrowthConfig(hidden_size=128), "llama")  # 8 heads of 16, 2 per KV head
    assert (wider["num_heads"], wider["num_kv_heads"]) == (8, 4)
    assert grown_sizes(now, GrowthConfig(num_heads=8, num_kv_heads=2), "llama")["num_kv_heads"] == 2
    # 6 heads over 3 KV heads (2 each) grown to 9 heads: 2 per KV head cannot be kept, 3 each can
    odd = {**now, "hidden_size": 96, "num_heads": 6, "num_kv_heads": 3}
    assert grown_sizes(odd, GrowthConfig(num_heads=9), "llama")["num_kv_heads"] == 3
    with pytest.raises(GrowthSizeError) as e:
        grown_sizes(now, GrowthConfig(num_heads=5), "llama")
    assert e.value.field == "num_kv_heads"
    bert = {k: v for k, v in now.items() if k != "num_kv_heads"}
    assert "num_kv_heads" not in grown_sizes(bert, GrowthConfig(hidden_size=128), "bert")


# --- growth at a stage boundary -------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["reset", "carry"])
def test_the_stages_growth_call_grows_a_llama_to_the_planned_sizes_with_its_kv_heads(optimizer):
    from ray_lifelong.stage.grow import grow_model
    from ray_lifelong.stage.step import build_optimizer

    # the shipped config's schedule at half the width: 64 (4 heads of 16, 2 KV heads) -> 96 (6 over the 3 KV
    # heads the config sets) -> 128 (8 over 4: the grouping kept)
    grow1, grow2 = "data.domains.1.grow", "data.domains.2.grow"
    cfg = load_config(ELLE_LLAMA, ["model.hidden_size=64", "model.num_heads=4", "model.intermediate_size=96",
                                   f"{grow1}.hidden_size=96", f"{grow1}.intermediate_size=128",
                                   f"{grow2}.hidden_size=128", f"{grow2}.intermediate_size=160",
                                   f"{grow1}.optimizer={optimizer}", f"{grow2}.optimizer={optimizer}"])
    plan = stage_model_sizes(cfg)
    model = build_model(cfg.model, VOCAB, pad_id=None, eos_id=EOS, seed=0).train()
    t = TrainConfig()
    state = None
    if optimizer == "carry":  # moments to carry: one step of training
        opt = build_optimizer(model, 1e-3, t)
        ids = torch.randint(0, VOCAB, (2, 12))
        lm_loss(*LMObjective(model)(ids)).backward()
        opt.step()
        state = opt.state_dict()
    for i in (1, 2):
        grown, carried, event, _ = grow_model(model, cfg.data.domains[i].grow, seed=i, train=t, lr=1e-3,
                                           optimizer_state=state, build_optimizer=build_optimizer)
        want = plan[i]
        assert event["after"] == {"num_hidden_layers": want["num_layers"], "hidden_size": want["hidden_size"],
                                  "num_attention_heads": want["num_heads"],
                                  "num_key_value_heads": want["num_kv_heads"],
                                  "intermediate_size": want["intermediate_size"]}
        assert grown.config.head_dim == 16 and not grown.config.tie_word_embeddings
        # identity depth, zero-write width: exact whatever the noise on copied entries
        assert event["max_logit_error"] < 1e-4
        assert (carried is not None) == (optimizer == "carry")
        # what the stage counts for this size, from the plan and from the model itself
        kw = dict(vocab=56, seq_len=64, arch="llama", mlm_probability=0.15)
        assert sequence_flops(want, **kw) == sequence_flops(model_sizes(grown), **kw)
        model = grown
        if carried is not None:
            opt = build_optimizer(model, 1e-3, t)
            opt.load_state_dict(carried)
            state = carried
    assert (plan[2]["num_heads"], plan[2]["num_kv_heads"]) == (8, 4)


# --- FLOPs ----------------------------------------------------------------------------------------------


def test_llama_flops_by_hand():
    # L=2, d=8, 4 heads of 2, 2 KV heads (K, V 8 x 4), d_ff=12, SwiGLU.
    # per layer: Q, O 2*64 = 128; K, V 2*8*4 = 64; gate, up, down 3*8*12 = 288 -> 480; N = 960
    assert non_embedding_params(2, 8, 12, kv_hidden=4, ffn_mats=3) == 960
    # S=5: body 5 * (2*960 + 2*2*5*8) = 10400; head 2*8*10 at the 4 causal positions = 640
    fwd = forward_flops_per_sequence(num_layers=2, hidden=8, ffn=12, vocab=10, seq_len=5, logit_positions=4,
                                     kv_hidden=4, ffn_mats=3)
    assert fwd == 11040
    want = {"num_layers": 2, "hidden": 8, "ffn": 12, "kv_hidden": 4, "ffn_mats": 3}
    cfg = ModelConfig(arch="llama", num_layers=2, hidden_size=8, num_heads=4, num_kv_heads=2,
                      intermediate_size=12)
    plan = {"num_layers": 2, "hidden_size": 8, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 12}
    saved = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 2, "intermediate_size": 12}
    grown = {"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 12}
    assert flops_sizes(cfg) == flops_sizes(plan) == flops_sizes(saved) == flops_sizes(grown) == want
    kw = dict(vocab=10, seq_len=5, arch="llama", mlm_probability=0.15)
    assert sequence_flops(cfg, **kw) == 3 * 11040 and sequence_flops(saved, train=False, **kw) == 11040
    # without grouping the same model counts K and V d x d: 2*64 more per layer
    assert flops_sizes(ModelConfig(arch="llama", num_layers=2, hidden_size=8, num_heads=4,
                                   intermediate_size=12))["kv_hidden"] == 8
    # a BERT of the same sizes keeps its own count: 4 d^2 + 2 d d_ff
    assert flops_sizes(ModelConfig(arch="bert", num_layers=2, hidden_size=8, num_heads=4,
                                   intermediate_size=12)) == {"num_layers": 2, "hidden": 8, "ffn": 12}


def test_llama_flops_count_the_matrices_a_built_model_has():
    m = build()
    layers = sum(p.numel() for n, p in m.named_parameters() if n.startswith("model.layers.") and p.ndim == 2)
    s = flops_sizes(m.config.to_dict())
    assert layers == non_embedding_params(s["num_layers"], s["hidden"], s["ffn"], kv_hidden=s["kv_hidden"],
                                          ffn_mats=s["ffn_mats"])
    assert count_parameters(m)["non_embedding"] > layers  # plus the norms and the untied output layer


# --- downstream -----------------------------------------------------------------------------------------


def test_a_classifier_on_a_llama_backbone_pools_the_last_real_token(tmp_path):
    from transformers import LlamaForSequenceClassification

    from ray_lifelong.downstream.tasks import encode_text

    build().save_pretrained(tmp_path)
    torch.manual_seed(0)
    clf = load_classifier(str(tmp_path), num_labels=3, pad_id=EOS).eval()
    assert isinstance(clf, LlamaForSequenceClassification)
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    ids = torch.tensor([short + [EOS] * 3, long])  # right padded with the EOS, as the fine-tuning loop does
    mask = torch.tensor([[1] * 3 + [0] * 3, [1] * 6])
    with torch.no_grad():
        logits = clf(input_ids=ids, attention_mask=mask).logits
        alone = clf(input_ids=torch.tensor([short])).logits
        loss = clf(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss
    assert logits.shape == (2, 3) and torch.isfinite(loss)
    torch.testing.assert_close(logits[0], alone[0], rtol=1e-5, atol=1e-5)

    class Tok:
        def __call__(self, text, add_special_tokens):
            return {"input_ids": [len(w) for w in text.split()]}

    assert encode_text(Tok(), "a bb ccc", arch="llama", max_length=3, prompt_id=40) == [40, 1, 2]
