import pytest
import torch

from ray_lifelong.config import ModelConfig
from ray_lifelong.data.packing import IGNORE_INDEX
from ray_lifelong.flops import forward_flops_per_sequence, logit_positions, non_embedding_params
from ray_lifelong.models.build import (
    LMObjective,
    build_model,
    count_parameters,
    lm_loss,
    load_model,
    padded_vocab,
)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_build_and_objective(tmp_path, arch):
    cfg = ModelConfig(arch=arch, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                      max_position_embeddings=64, dropout=0.0, vocab_multiple=1)
    model = build_model(cfg, vocab_size=100, pad_id=0, eos_id=1).eval()
    assert count_parameters(model)["non_embedding"] > non_embedding_params(2, 32, 64)  # plus LN, biases
    ids = torch.randint(5, 100, (3, 16))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 4] = ids[:, 4]
    obj = LMObjective(model)
    logits, targets = obj(ids, labels if arch == "bert" else None)
    if arch == "bert":
        assert logits.shape == (3, 100) and torch.equal(targets, ids[:, 4])
        ref = model(input_ids=ids).logits[:, 4]
    else:
        assert logits.shape == (3 * 15, 100) and torch.equal(targets, ids[:, 1:].reshape(-1))
        ref = model(input_ids=ids).logits[:, :-1].reshape(-1, 100)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)  # same as the full HF forward
    assert lm_loss(logits, targets).ndim == 0
    model.save_pretrained(tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    assert type(again) is type(model)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_an_odd_vocabulary_gets_aligned_rows_that_are_never_targets(arch):
    cfg = ModelConfig(arch=arch, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                      max_position_embeddings=32)  # vocab_multiple 64 by default
    model = build_model(cfg, vocab_size=101, pad_id=0, eos_id=1).eval()
    assert model.get_input_embeddings().weight.shape[0] == 128 == model.config.vocab_size
    ids = torch.randint(5, 101, (2, 8))
    logits, targets = LMObjective(model)(ids, None if arch == "gpt2" else ids)
    assert logits.shape[1] == 128 and int(targets.max()) < 101


def test_padded_vocab():
    for n in range(1, 300):
        for m in (1, 8, 64):
            p = padded_vocab(n, m)
            assert p % m == 0 and n <= p < n + m


def test_flops_counts():
    # 1 layer, d=2, ff=4: N = 4*4 + 2*2*4 = 32; S=3: body = 3*(64 + 2*1*3*2) = 228; head 2*2*10*1
    assert forward_flops_per_sequence(num_layers=1, hidden=2, ffn=4, vocab=10, seq_len=3,
                                      logit_positions=1) == 228 + 40
    assert logit_positions("bert", 100, 0.15) == pytest.approx(15.0)
    assert logit_positions("gpt2", 100, 0.15) == 99.0


def test_every_spelling_of_a_models_sizes_gives_the_same_flops():
    from ray_lifelong.config.schema import ModelConfig
    from ray_lifelong.flops import flops_sizes, sequence_flops

    want = {"num_layers": 3, "hidden": 64, "ffn": 256}
    assert flops_sizes(ModelConfig(num_layers=3, hidden_size=64, intermediate_size=256)) == want
    assert flops_sizes({"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 256}) == want
    assert flops_sizes({"n_layer": 3, "n_embd": 64, "n_inner": None}) == want  # GPT-2: None is 4 x n_embd
    kw = {"vocab": 100, "seq_len": 16, "arch": "bert", "mlm_probability": 0.15}
    fwd = sequence_flops({"n_layer": 3, "n_embd": 64, "n_inner": 256}, train=False, **kw)
    assert sequence_flops(ModelConfig(num_layers=3, hidden_size=64, intermediate_size=256), **kw) == 3 * fwd
    assert fwd == forward_flops_per_sequence(num_layers=3, hidden=64, ffn=256, vocab=100, seq_len=16,
                                             logit_positions=0.15 * 16)
