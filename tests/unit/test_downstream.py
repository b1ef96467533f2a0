"""Downstream tasks without Ray: metrics, label maps, prompt placement, record errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_lifelong.config.schema import TaskConfig
from ray_lifelong.data.sources import DataError
from ray_lifelong.downstream.run import pretrained_with_prompts
from ray_lifelong.downstream.tasks import encode_task, encode_text, label_map, map_labels, read_split
from ray_lifelong.eval.classification import accuracy, macro_f1, majority_baseline, micro_f1

pairs = st.integers(1, 40).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 4), min_size=n, max_size=n),
                                                       st.lists(st.integers(0, 4), min_size=n, max_size=n)))


@settings(max_examples=200, deadline=None)
@given(pairs)
def test_metrics_are_bounded_and_perfect_predictions_score_one(pl):
    preds, labels = pl
    for f in (accuracy, macro_f1, micro_f1):
        assert 0.0 <= f(preds, labels) <= 1.0
        assert f(labels, labels) == 1.0
    assert micro_f1(preds, labels) == accuracy(preds, labels)
    # macro-F1 from the confusion counts, written differently
    classes = set(preds) | set(labels)
    f1 = []
    for c in classes:
        tp = sum(1 for p, y in zip(preds, labels) if p == y == c)
        pred_c, true_c = preds.count(c), labels.count(c)
        f1.append(0.0 if tp == 0 else 2 * tp / (pred_c + true_c))
    assert macro_f1(preds, labels) == pytest.approx(sum(f1) / len(f1))


def test_majority_baseline_and_macro_f1_punish_a_constant_guess():
    labels = [0, 0, 0, 1]
    assert majority_baseline("accuracy", [0, 0, 1], labels) == 0.75
    assert majority_baseline("macro_f1", [0, 0, 1], labels) == pytest.approx((2 * 3 / (4 + 3) + 0) / 2)
    with pytest.raises(ValueError, match="as many predictions as labels"):
        accuracy([1], [1, 0])


def _write(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _task(tmp_path, train, valid, test, **kw) -> TaskConfig:
    return TaskConfig(name="t", domain="sports", train=[_write(tmp_path / "train.jsonl.gz", train)],
                      valid=[_write(tmp_path / "valid.jsonl.gz", valid)],
                      test=[_write(tmp_path / "test.jsonl.gz", test)], **kw)


def test_labels_map_the_same_way_in_every_split_whatever_the_file_order(tmp_path):
    train = [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}, {"text": "z", "label": "pos"}]
    task = _task(tmp_path, train, [{"text": "a", "label": "neg"}], [{"text": "b", "label": "pos"}])
    recs = read_split(task, "train")
    m = label_map(recs)
    assert m == {"neg": 0, "pos": 1} == label_map(list(reversed(recs)))
    assert map_labels(read_split(task, "test"), m, "t") == [1]
    assert map_labels(read_split(task, "valid"), m, "t") == [0]
    numeric = _task(tmp_path / "n", [{"text": "x", "label": 3}, {"text": "y", "label": 1}],
                    [{"text": "a", "label": 1}], [{"text": "b", "label": 3}])
    assert label_map(read_split(numeric, "train")) == {"1": 0, "3": 1}  # JSON numbers become label names


def test_a_label_unseen_in_training_is_an_error_naming_file_and_line(tmp_path):
    task = _task(
        tmp_path,
        [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}],
        [{"text": "a", "label": "neg"}],
        [{"text": "b", "label": "pos"}, {"text": "c", "label": "meh"}],
    )
    m = label_map(read_split(task, "train"))
    with pytest.raises(DataError, match=r"test\.jsonl\.gz, line 2: label 'meh' of task 't' never occurs"):
        map_labels(read_split(task, "test"), m, "t")


def test_a_record_without_its_label_names_file_and_line(tmp_path):
    task = _task(
        tmp_path,
        [{"text": "x", "label": "pos"}, {"text": "y"}],
        [{"text": "a", "label": "pos"}],
        [{"text": "b", "label": "pos"}],
    )
    with pytest.raises(DataError, match=r"train\.jsonl\.gz, line 2: record has no 'label' field"):
        read_split(task, "train")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from ray_lifelong.data.tokenizer import prompt_tokens, train_tokenizer

    texts = ["the match ended in a draw after extra time", "stars and planets orbit in the galaxy"] * 50
    out = {}
    for kind in ("wordpiece", "bpe"):
        out[kind] = train_tokenizer(
            texts,
            tmp_path_factory.mktemp(kind),
            kind=kind,
            vocab_size=300,
            prompts=prompt_tokens(["sports", "astronomy"]),
            min_frequency=1,
        )
    return out


@pytest.mark.parametrize("arch, kind", [("bert", "wordpiece"), ("gpt2", "bpe")])
def test_the_prompt_is_prepended_exactly_once_where_pretraining_put_it(tokenizers, arch, kind, tmp_path):
    from ray_lifelong.data.tokenizer import prompt_token

    tok = tokenizers[kind]
    pid = tok.convert_tokens_to_ids(prompt_token("sports"))
    ids = encode_text(tok, "the match ended", arch=arch, max_length=64, prompt_id=pid)
    plain = encode_text(tok, "the match ended", arch=arch, max_length=64, prompt_id=None)
    assert ids.count(pid) == 1 and pid not in plain
    assert ids.index(pid) == (1 if arch == "bert" else 0)
    if arch == "bert":
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and ids.count(tok.cls_token_id) == 1
    assert [i for i in ids if i != pid] == plain  # nothing else changes
    long = encode_text(tok, "stars and planets " * 50, arch=arch, max_length=16, prompt_id=pid)
    assert len(long) == 16 and long.count(pid) == 1
    task = _task(
        tmp_path,
        [{"text": "the match", "label": "a"}, {"text": "stars", "label": "b"}],
        [{"text": "planets", "label": "b"}],
        [{"text": "draw", "label": "a"}],
    )
    enc = encode_task(task, tok, arch=arch, max_length=32, prompts=True)
    assert all(row.count(pid) == 1 for split in (enc.train, enc.valid, enc.test) for row in split.ids)
    with pytest.raises(DataError, match="no prompt token '<dom:cooking>'"):
        encode_task(
            TaskConfig(name="c", domain="cooking", train=task.train, valid=task.valid, test=task.test),
            tok,
            arch=arch,
            max_length=32,
            prompts=True,
        )


def test_prompts_follow_the_pretraining_config_beside_the_model(tmp_path):
    (tmp_path / "final_model").mkdir()
    assert pretrained_with_prompts(str(tmp_path / "final_model")) is False
    (tmp_path / "config.yaml").write_text("continual:\n  prompts: true\n")
    assert pretrained_with_prompts(str(tmp_path / "final_model")) is True


def test_a_finished_job_is_reused_only_under_the_same_settings():
    from ray_lifelong.config import load_config
    from ray_lifelong.downstream.run import job_key

    cfg = load_config(None, ["finetune.seeds=[0]"])
    key = job_key(cfg, "/m", True)
    assert key == job_key(
        load_config(None, ["finetune.seeds=[0, 1, 2]", "finetune.max_concurrent=4"]), "/m", True
    )
    assert key != job_key(cfg, "/m", False) and key != job_key(cfg, "/other", True)
    assert key != job_key(load_config(None, ["finetune.lr=1.0e-3"]), "/m", True)


def test_a_training_subset_keeps_every_class_of_the_split(tokenizers, tmp_path):
    rows = [{"text": f"doc {i}", "label": "common"} for i in range(5)] + [
        {"text": "rare one", "label": "rare"}
    ]
    task = _task(
        tmp_path,
        rows,
        [{"text": "a", "label": "rare"}],
        [{"text": "b", "label": "common"}],
        max_train_examples=3,
    )
    enc = encode_task(task, tokenizers["bpe"], arch="gpt2", max_length=16, prompts=False)
    assert enc.label_names == ["common", "rare"] and len(enc.train.labels) == 3 and enc.valid.labels == [1]
