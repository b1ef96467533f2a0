"""Runs that start from a saved checkpoint (``model.init_from``): a Llama and a RoBERTa continued over two
demo domains with ELLE's pieces (growth before the second, its function-recovering warmup, replay, prompts),
in one Ray session."""

from __future__ import annotations

import json

import pytest
import torch

from ray_lifelong.config import load_config
from ray_lifelong.pipeline import run_lifelong
from tests.conftest import demo_texts, save_checkpoint_dir

pytestmark = [pytest.mark.e2e]


def continue_overrides(root, out, checkpoint, name: str) -> list[str]:
    """Continue ``checkpoint`` (no model sizes: they come from it) on sports, then astronomy grown to 2 layers
    of width 64 with FFN 128; one worker, five steps a stage."""
    dom = "{{name: {0}, train: ['{1}/{0}/train-*.jsonl.gz'], valid: ['{1}/{0}/valid-*.jsonl.gz']{2}}}"
    grow = ", grow: {num_layers: 2, hidden_size: 64, intermediate_size: 128}"
    return [
        f"output_dir={out}", f"run_name={name}", f"model.init_from={checkpoint}",
        f"data.domains=[{dom.format('sports', root, '')}, {dom.format('astronomy', root, grow)}]",
        "data.seq_len=32", "data.eval_max_sequences=8",
        "train.steps=5", "train.batch_size=4", "train.micro_batch_size=4", "train.lr=3e-3",
        "train.log_every=5", "train.checkpoint_every=5", "train.warmup_ratio=0.2",
        "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "ray.max_failures=1",
        "continual.prompts=true", "continual.replay.enabled=true", "continual.replay.memory_fraction=0.3",
        "continual.replay.ratio=0.25", "continual.frw.steps=2", "continual.frw.warmup_steps=1",
    ]


def check_run(run, res, prompts=("sports", "astronomy")):
    """What every continued run leaves: the checkpoint's perplexities before stage 0 in results.json and the
    report, a trained first domain, and the prompt tokens in the exported tokenizer."""
    from transformers import AutoTokenizer

    assert res["domains"] == list(prompts) and len(res["initial_ppl"]) == 2
    assert json.loads((run / "results.json").read_text())["initial_ppl"] == res["initial_ppl"]
    assert res["ppl_matrix"][0][0] < res["initial_ppl"][0]  # training on sports helped sports
    assert "before stage 0 (model.init_from)" in (run / "report.md").read_text()
    assert res["stages"][1]["growth"]["after"]["num_hidden_layers"] == 2
    tok = AutoTokenizer.from_pretrained(run / "final_model", local_files_only=True)
    assert all(tok.convert_tokens_to_ids(f"<dom:{d}>") != tok.unk_token_id for d in prompts)
    return tok


def test_a_llama_checkpoint_continues_grows_and_generates(ray_4cpus, demo_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint = save_checkpoint_dir(tmp_path / "llama", demo_texts(demo_corpus), "llama")
    cfg = load_config(None, continue_overrides(demo_corpus, tmp_path / "runs", checkpoint, "llama"))
    assert (cfg.model.arch, cfg.model.num_layers, cfg.model.num_kv_heads) == ("llama", 1, 1)
    res = run_lifelong(cfg)
    run = tmp_path / "runs" / "llama"
    tok = check_run(run, res)
    model = AutoModelForCausalLM.from_pretrained(run / "final_model", local_files_only=True)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (2, 64, 4, 2)
    ids = tok("<dom:astronomy> the star", return_tensors="pt")
    assert ids["input_ids"][0, 0] == tok.bos_token_id  # the checkpoint's convention, kept
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # a resumed run skips its finished stages and keeps the perplexities measured before the first
    again = run_lifelong(cfg, resume=True)
    assert again["initial_ppl"] == res["initial_ppl"] and again["ppl_matrix"] == res["ppl_matrix"]


def test_a_roberta_checkpoint_continues_with_mlm_and_grows(ray_4cpus, demo_corpus, tmp_path):
    from transformers import AutoModelForMaskedLM

    checkpoint = save_checkpoint_dir(tmp_path / "roberta", demo_texts(demo_corpus), "roberta")
    cfg = load_config(None, continue_overrides(demo_corpus, tmp_path / "runs", checkpoint, "roberta"))
    # RoBERTa is a masked LM of the bert family; two of its 66 position rows are not positions
    assert (cfg.model.arch, cfg.model.max_position_embeddings) == ("bert", 64)
    res = run_lifelong(cfg)
    run = tmp_path / "runs" / "roberta"
    tok = check_run(run, res)
    model = AutoModelForMaskedLM.from_pretrained(run / "final_model", local_files_only=True).eval()
    assert type(model).__name__ == "RobertaForMaskedLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 64)
    ids = tok("<dom:sports> the team <mask> the game", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.cls_token_id == tok.convert_tokens_to_ids("<s>")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
