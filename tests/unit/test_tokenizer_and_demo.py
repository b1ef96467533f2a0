import gzip
import json

import pytest

from ray_lifelong.config import DomainConfig
from ray_lifelong.data.demo import DEMO_DOMAINS, generate_documents, write_demo_corpus
from ray_lifelong.data.stream import TokenizePack
from ray_lifelong.data.tokenizer import (
    ensure_prompt_tokens,
    load_tokenizer,
    prompt_token,
    prompt_tokens,
    sample_texts,
    train_tokenizer,
)


def test_demo_is_deterministic_and_domains_differ(tmp_path):
    assert generate_documents("sports", 5, 0) == generate_documents("sports", 5, 0)
    assert generate_documents("sports", 5, 0) != generate_documents("sports", 5, 1)
    vocab = {d: set(" ".join(generate_documents(d, 200, 0)).lower().split()) for d in DEMO_DOMAINS[:4]}
    for a in vocab:
        for b in vocab:
            if a < b:
                overlap = len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b])
                assert overlap < 0.2, (a, b, overlap)  # only function words are shared
    p1 = write_demo_corpus(tmp_path / "x", ["cooking"], train_docs=30, valid_docs=5)
    p2 = write_demo_corpus(tmp_path / "y", ["cooking"], train_docs=30, valid_docs=5)
    for a, b in zip(p1["cooking"]["train"], p2["cooking"]["train"]):
        assert open(a, "rb").read() == open(b, "rb").read()  # byte-identical files
    with gzip.open(p1["cooking"]["valid"][0]) as f:
        assert len([json.loads(line)["text"] for line in f]) == 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("c")
    write_demo_corpus(root, ["sports", "finance"], train_docs=100, valid_docs=5)
    return [DomainConfig(name=d, train=[f"{root}/{d}/train-*.jsonl.gz"]) for d in ("sports", "finance")]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_train_tokenizer_reserves_prompt_tokens(tmp_path, corpus, kind):
    prompts = prompt_tokens(["sports", "finance"], reserved=2)
    tok = train_tokenizer(sample_texts(corpus, 100), tmp_path / kind, kind=kind, vocab_size=500, prompts=prompts)
    again = load_tokenizer(tmp_path / kind)
    assert len(again) == len(tok) <= 500 + len(prompts) + 6
    for p in prompts:
        ids = again(f"the {p} market", add_special_tokens=False)["input_ids"]
        assert again.convert_tokens_to_ids(p) in ids  # a prompt is one token, never split
    assert ensure_prompt_tokens(again, ["sports", "finance"]) == 0
    assert ensure_prompt_tokens(again, ["medicine"]) == 1
    assert again.convert_tokens_to_ids(prompt_token("medicine")) == len(again) - 1
    if kind == "wordpiece":
        assert again.mask_token == "[MASK]" and again.cls_token_id is not None
    else:
        assert again.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("kind, arch", [("wordpiece", "bert"), ("bpe", "gpt2")])
def test_tokenize_pack_udf_layout(tmp_path, corpus, kind, arch):
    import numpy as np

    train_tokenizer(sample_texts(corpus, 50), tmp_path / "t", kind=kind, vocab_size=400,
                    prompts=prompt_tokens(["sports", "cooking"]))
    udf = TokenizePack(str(tmp_path / "t"), seq_len=16, arch=arch,
                       prompts={0: prompt_token("sports"), 1: prompt_token("cooking")})
    texts = generate_documents("sports", 6, 0) + generate_documents("cooking", 6, 0)
    out = udf({"text": np.array(texts, dtype=object), "domain_id": np.repeat(np.arange(2, dtype=np.int32), 6)})
    cooking = out["input_ids"][out["domain_id"] == 1]
    rows = out["input_ids"][out["domain_id"] == 0]
    cid = udf.tok.convert_tokens_to_ids(prompt_token("cooking"))
    assert len(cooking) and (cooking[:, 1 if arch == "bert" else 0] == cid).all()  # each domain its own prompt
    assert rows.shape[1] == 16 and len(out["input_ids"]) == len(out["domain_id"]) and len(rows) > 0
    tok = udf.tok
    pid = tok.convert_tokens_to_ids(prompt_token("sports"))
    if arch == "bert":
        assert (rows[:, 0] == tok.cls_token_id).all() and (rows[:, 1] == pid).all()
        assert (rows[:, -1] == tok.sep_token_id).all()
    else:
        assert (rows[:, 0] == pid).all()
