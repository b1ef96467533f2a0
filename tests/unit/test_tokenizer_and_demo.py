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
    tok = train_tokenizer(
        sample_texts(corpus, 100), tmp_path / kind, kind=kind, vocab_size=500, prompts=prompts
    )
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


@pytest.mark.parametrize("style", ["wordpiece", "bpe", "llama", "roberta"])
def test_a_generic_fast_tokenizer_loads_as_autotokenizer_loads_it_without_torch(tmp_path, corpus, style):
    """The project's own tokenizers (and checkpoints saved with the generic fast class) are loaded with that
    class directly: the same class, vocabulary, specials and encodings as ``AutoTokenizer`` gives, and a
    process that only tokenizes (the data pipeline's actors) does not import torch for it."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from tests.conftest import checkpoint_tokenizer

    texts = list(sample_texts(corpus, 100))
    if style in ("wordpiece", "bpe"):
        train_tokenizer(texts, tmp_path, kind=style, vocab_size=400, prompts=prompt_tokens(["sports"]))
    else:
        checkpoint_tokenizer(texts, style).save_pretrained(str(tmp_path))
    ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert type(ours) is type(auto)
    assert ours.get_vocab() == auto.get_vocab() and ours.all_special_ids == auto.all_special_ids
    for name in ("bos", "eos", "cls", "sep", "mask", "pad", "unk"):
        assert getattr(ours, f"{name}_token_id") == getattr(auto, f"{name}_token_id"), name
    for special in (False, True):
        assert ours(texts[:20], add_special_tokens=special)["input_ids"] == \
            auto(texts[:20], add_special_tokens=special)["input_ids"]
    code = (f"import sys; from ray_lifelong.data.tokenizer import load_tokenizer; "
            f"load_tokenizer({str(tmp_path)!r})('a b'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("kind, arch", [("wordpiece", "bert"), ("bpe", "gpt2")])
def test_tokenize_pack_udf_layout(tmp_path, corpus, kind, arch):
    import numpy as np

    train_tokenizer(
        sample_texts(corpus, 50),
        tmp_path / "t",
        kind=kind,
        vocab_size=400,
        prompts=prompt_tokens(["sports", "cooking"]),
    )
    udf = TokenizePack(
        str(tmp_path / "t"),
        seq_len=16,
        arch=arch,
        prompts={0: prompt_token("sports"), 1: prompt_token("cooking")},
    )
    texts = generate_documents("sports", 6, 0) + generate_documents("cooking", 6, 0)
    out = udf(
        {"text": np.array(texts, dtype=object), "domain_id": np.repeat(np.arange(2, dtype=np.int32), 6)}
    )
    cooking = out["input_ids"][out["domain_id"] == 1]
    rows = out["input_ids"][out["domain_id"] == 0]
    tok = load_tokenizer(tmp_path / "t")
    cid = tok.convert_tokens_to_ids(prompt_token("cooking"))
    # each domain its own prompt
    assert len(cooking) and (cooking[:, 1 if arch == "bert" else 0] == cid).all()
    assert rows.shape[1] == 16 and len(out["input_ids"]) == len(out["domain_id"]) and len(rows) > 0
    pid = tok.convert_tokens_to_ids(prompt_token("sports"))
    if arch == "bert":
        assert (rows[:, 0] == tok.cls_token_id).all() and (rows[:, 1] == pid).all()
        assert (rows[:, -1] == tok.sep_token_id).all()
    else:
        assert (rows[:, 0] == pid).all()


@pytest.mark.parametrize("style", ["wordpiece", "bpe", "llama", "roberta"])
def test_a_tokenizer_actor_on_the_tokenizers_library_packs_the_rows_that_transformers_gives(
        tmp_path, corpus, style):
    """Given the layouts made where transformers loaded the tokenizer, a :class:`TokenizePack` encodes with
    the ``tokenizers`` library alone: the same rows, batch after batch (with the carry), as one that loads
    the tokenizer through transformers; a tokenizer with Python-side handling of its own keeps that path."""
    import subprocess
    import sys

    import numpy as np
    from transformers import BertTokenizerFast

    from ray_lifelong.data.stream import encodes_alike, pack_layouts
    from tests.conftest import checkpoint_tokenizer

    texts = list(sample_texts(corpus, 100))
    if style in ("wordpiece", "bpe"):
        train_tokenizer(texts, tmp_path, kind=style, vocab_size=400, prompts=prompt_tokens(["sports"]))
    else:
        tok = checkpoint_tokenizer(texts, style)
        ensure_prompt_tokens(tok, ["sports"])
        tok.save_pretrained(str(tmp_path))
    arch = {"wordpiece": "bert", "roberta": "bert", "bpe": "gpt2", "llama": "llama"}[style]
    tok = load_tokenizer(tmp_path)
    assert encodes_alike(tok, str(tmp_path))
    prompts = {0: prompt_token("sports")}
    layouts = pack_layouts(tok, 24, arch, prompts)
    via_hf = TokenizePack(str(tmp_path), 24, arch, prompts)
    alone = TokenizePack(str(tmp_path), 24, arch, prompts, layouts=layouts)
    for start in range(0, 60, 20):  # three batches: the leftover of each carries into the next
        batch = {"text": np.array(texts[start:start + 20], dtype=object), "domain_id": np.zeros(20, np.int32)}
        a, b = via_hf(batch), alone(batch)
        assert len(a["input_ids"]) > 0 and np.array_equal(a["input_ids"], b["input_ids"])
        assert np.array_equal(a["domain_id"], b["domain_id"])
    assert via_hf.carry == alone.carry
    # a process that packs this way imports no transformers
    code = (f"import sys, numpy as np; from ray_lifelong.data.stream import TokenizePack, backend_encoder; "
            f"backend_encoder({str(tmp_path)!r})(['a b']); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr[-2000:]
    if style == "wordpiece":  # a class of its own (BERT's): not the generic one, so not encoded alone
        BertTokenizerFast(tokenizer_object=tok.backend_tokenizer).save_pretrained(str(tmp_path / "bert"))
        assert not encodes_alike(load_tokenizer(tmp_path / "bert"), str(tmp_path / "bert"))


def test_wordpiece_merges_the_most_frequent_pair_first_and_breaks_ties_by_older_symbols():
    from ray_lifelong.data.wordpiece import train_wordpiece_vocab

    # pairs: (a,##b) 5+2, (##b,##c) 5, (b,##a) 3, (##b,##a) 2: "ab" first; then (b,##a) 3 beats (##b,##c)'s
    # remaining 0; with min_frequency 2 the last merge is (ab, ##a) at 2
    vocab = train_wordpiece_vocab({"abc": 5, "ba": 3, "aba": 2}, vocab_size=100, specials=["[UNK]"])
    base = ["[UNK]", "a", "b", "c", "##a", "##b", "##c"]  # every character of every word, then its ## form
    assert list(vocab)[:7] == base and list(vocab.values()) == list(range(len(vocab)))
    assert list(vocab)[7:] == ["ab", "abc", "ba", "aba"]
    # a tie (x,##y) 4 vs (y,##x) 4: the pair of lower ids ("x" < "y") merges first
    tie = train_wordpiece_vocab({"xy": 4, "yx": 4}, vocab_size=100, specials=[])
    assert list(tie)[4:] == ["xy", "yx"]
    # vocab_size caps it
    assert len(train_wordpiece_vocab({"xy": 4, "yx": 4}, vocab_size=5, specials=[])) == 5
    assert list(train_wordpiece_vocab({"xy": 1}, vocab_size=100, specials=[], min_frequency=2)) == [
        "x",
        "y",
        "##y",
    ]


@pytest.mark.parametrize("config, runs", [("configs/elle_demo.yaml", 5), ("configs/tune_ki.yaml", 2)])
def test_a_configs_tokenizer_is_the_same_in_every_process(tmp_path, config, runs):
    """`ray-lifelong tokenizer` in separate processes: one tokenizer.json. tokenizers' own WordPiece trainer
    broke count ties in a per-process hash order and gave a different vocabulary each time; its byte-level
    BPE (GPT-2, the second config) is deterministic and stays in use."""
    import subprocess
    import sys

    from tests.conftest import REPO

    # the config's demo data, written under tmp_path by the first process (its paths are relative)
    args = [sys.executable, "-m", "ray_lifelong", "tokenizer", str(REPO / config), "demo.train_docs=400"]
    subprocess.run(args + ["--out", str(tmp_path / "first")], check=True, capture_output=True, cwd=tmp_path)
    procs = [
        subprocess.Popen(
            args + ["--out", str(tmp_path / f"t{i}")],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(runs - 1)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    outs = ["first"] + [f"t{i}" for i in range(runs - 1)]
    assert len({(tmp_path / d / "tokenizer.json").read_bytes() for d in outs}) == 1
