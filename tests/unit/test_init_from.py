"""Starting a run from a saved checkpoint (``model.init_from``): what the config takes from it, what is
refused before any Ray work, the tokenizer and the prompt rows it gets. Tiny checkpoints saved offline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ray_lifelong.config import ConfigError, load_config, save_config
from ray_lifelong.config.plan import stage_plans
from ray_lifelong.data.stream import pack_spec
from ray_lifelong.data.tokenizer import document_bos, load_tokenizer
from ray_lifelong.models.build import LMObjective, load_model, padded_vocab
from ray_lifelong.models.init_from import add_token_rows
from ray_lifelong.models.saved import inspect_checkpoint, local_model_dir
from ray_lifelong.pipeline import prepare_start
from tests.conftest import checkpoint_tokenizer, demo_texts, save_checkpoint_dir

GROW = "grow: {num_layers: 2, hidden_size: 64, intermediate_size: 128}"


@pytest.fixture(scope="module")
def checkpoints(demo_corpus, tmp_path_factory):
    root, texts = tmp_path_factory.mktemp("checkpoints"), demo_texts(demo_corpus)
    return {style: save_checkpoint_dir(root / style, texts, style) for style in ("llama", "roberta")}


def overrides(root, out, checkpoint, *extra, grow: str = "") -> list[str]:
    """Two demo domains continuing ``checkpoint`` (``grow``: the second domain's growth)."""
    dom = "{{name: {0}, train: ['{1}/{0}/train-*.jsonl.gz'], valid: ['{1}/{0}/valid-*.jsonl.gz']{2}}}"
    second = dom.format("astronomy", root, f", {grow}" if grow else "")
    return [f"output_dir={out}", f"model.init_from={checkpoint}", "data.seq_len=32",
            f"data.domains=[{dom.format('sports', root, '')}, {second}]", *extra]


def test_the_architecture_and_sizes_come_from_the_checkpoint(checkpoints, demo_corpus, tmp_path):
    cfg = load_config(None, overrides(demo_corpus, tmp_path, checkpoints["llama"], grow=GROW))
    m = cfg.model
    assert (m.arch, m.num_layers, m.hidden_size, m.num_heads, m.intermediate_size, m.num_kv_heads) == (
        "llama", 1, 32, 2, 64, 1)
    assert (m.max_position_embeddings, m.tie_embeddings, m.dropout) == (64, False, 0.0)
    # the plans (and so the FLOP counts and growth checks) see the checkpoint's sizes, then the growth's
    assert [p.sizes for p in stage_plans(cfg)] == [
        {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "num_kv_heads": 1},
        {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128, "num_kv_heads": 2}]
    save_config(cfg, tmp_path / "saved.yaml")  # every field is set there now, and agrees
    assert load_config(tmp_path / "saved.yaml").model == m
    roberta = load_config(None, overrides(demo_corpus, tmp_path, checkpoints["roberta"])).model
    # RoBERTa is a masked LM of the bert family; 2 of its 66 position rows are never a position
    assert (roberta.arch, roberta.max_position_embeddings, roberta.dropout) == ("bert", 64, 0.1)


def test_a_sweeps_values_are_checked_against_the_checkpoint_too(checkpoints, demo_corpus, tmp_path):
    from ray_lifelong.config import with_values

    cfg = load_config(None, overrides(demo_corpus, tmp_path, checkpoints["llama"]))
    assert with_values(cfg, {"train.lr": 0.01}).model == cfg.model
    with pytest.raises(ConfigError, match=r"model\.hidden_size=64 \(the checkpoint's: 32\)"):
        with_values(cfg, {"model.hidden_size": 64})


def test_a_run_directory_and_a_stage_checkpoint_lead_to_their_model(checkpoints, tmp_path):
    shutil.copytree(checkpoints["llama"], tmp_path / "run" / "final_model")
    shutil.copytree(checkpoints["llama"], tmp_path / "checkpoint_000001" / "model")
    for path, sub in ((tmp_path / "run", "final_model"), (tmp_path / "checkpoint_000001", "model")):
        saved = inspect_checkpoint(str(path))
        assert saved.model_dir == str(path / sub) and saved.arch == "llama" and saved.has_tokenizer


@pytest.mark.parametrize("setting, message", [
    ("model.arch=gpt2", r"model\.arch=gpt2 \(the checkpoint's: llama\)"),
    ("model.num_layers=3", r"model\.num_layers=3 \(the checkpoint's: 1\)"),
    ("model.num_kv_heads=2", r"model\.num_kv_heads=2 \(the checkpoint's: 1\)"),
])
def test_a_set_field_that_disagrees_is_refused(checkpoints, demo_corpus, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, overrides(demo_corpus, tmp_path, checkpoints["llama"], setting))
    assert str(checkpoints["llama"]) in str(e.value) and "leave these unset" in str(e.value)


def test_set_fields_that_agree_pass_and_dropout_is_applied(checkpoints, demo_corpus, tmp_path):
    cfg = load_config(None, overrides(demo_corpus, tmp_path, checkpoints["llama"], "model.arch=llama",
                                      "model.num_layers=1", "model.dropout=0.2"))
    assert cfg.model.dropout == 0.2
    _, start = prepare_start(cfg)
    model = load_model(str(tmp_path / "run" / "init" / "model"))
    assert start is not None and model.config.attention_dropout == 0.2


def _fake_checkpoint(path, model_type="llama", weights=True):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 10}))
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such directory"),
    (lambda p: p.mkdir() or p, r"no config\.json \(looked in final_model/, model/ and the directory "
                               r"itself\)"),
    (lambda p: _fake_checkpoint(p, weights=False), r"config\.json but no weights \(model\.safetensors"),
    (lambda p: _fake_checkpoint(p, "t5"), "model type 't5' is not supported; supported: bert, roberta, gpt2, "
                                         "llama, mistral, qwen2"),
], ids=["missing", "no-config", "no-weights", "t5"])
def test_a_checkpoint_that_cannot_start_a_run_is_named_in_one_line(demo_corpus, tmp_path, make, message):
    path = make(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, overrides(demo_corpus, tmp_path, path))
    assert f"model.init_from: {path}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("style, grow, setting, message", [
    ("llama", "grow: {hidden_size: 16}", None,
     r"data\.domains\[1\]\.grow\.hidden_size: growth cannot shrink a model: hidden_size 32 -> 16"),
    ("llama", "grow: {hidden_size: 48, num_heads: 4}", None,
     r"data\.domains\[1\]\.grow\.hidden_size: hidden_size 48 / num_heads 4 changes the head size 16"),
    ("roberta", "", "data.seq_len=65", r"data\.seq_len: 65 exceeds model\.max_position_embeddings=64"),
    ("llama", GROW, "continual.growth=final", r"continual\.growth: final .* the checkpoint's size"),
], ids=["shrink", "head-size", "positions", "final-size"])
def test_what_the_checkpoint_cannot_do_is_refused_at_load(checkpoints, demo_corpus, tmp_path, style, grow,
                                                          setting, message):
    extra = [setting] if setting else []
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides(demo_corpus, tmp_path, checkpoints[style], *extra, grow=grow))


def test_the_tokenizer_gets_the_prompts_and_the_embeddings_rows_at_the_mean(checkpoints, demo_corpus,
                                                                           tmp_path):
    cfg = load_config(None, overrides(demo_corpus, tmp_path, checkpoints["llama"], "continual.prompts=true"))
    tok_dir, start = prepare_start(cfg)
    tok, old = load_tokenizer(tok_dir), load_tokenizer(checkpoints["llama"])
    new = [tok.convert_tokens_to_ids(f"<dom:{d}>") for d in ("sports", "astronomy")]
    assert new == [len(old), len(old) + 1] and tok.get_vocab() == {**old.get_vocab(), **dict(zip(
        ("<dom:sports>", "<dom:astronomy>"), new))}
    init = tmp_path / "run" / "init"
    model, before = load_model(str(init / "model")), load_model(str(checkpoints["llama"]))
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == padded_vocab(len(tok), 64) == model.lm_head.weight.shape[0]
    torch.testing.assert_close(rows[new], before.get_input_embeddings().weight.mean(0).expand(2, -1))
    written = (init / "init.json").stat().st_mtime_ns
    assert prepare_start(cfg)[1].path == start.path and (init / "init.json").stat().st_mtime_ns == written
    # without prompts nothing changes: stage 0 loads the checkpoint where it is
    off = load_config(None, overrides(demo_corpus, tmp_path / "off", checkpoints["llama"]))
    prepare_start(off)
    assert (tmp_path / "off" / "run" / "init" / "model").resolve() == checkpoints["llama"].resolve()


def _tiny(kind: str, vocab: int = 60, tied: bool = True):
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    torch.manual_seed(0)
    sizes = dict(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, tie_word_embeddings=tied)
    model = {"bert": lambda: BertForMaskedLM(BertConfig(**sizes)),
             "roberta": lambda: RobertaForMaskedLM(RobertaConfig(**sizes, pad_token_id=1)),
             "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2,
                                                        bos_token_id=0, eos_token_id=0)),
             "llama": lambda: LlamaForCausalLM(LlamaConfig(**sizes))}[kind]()
    with torch.no_grad():  # biases away from 0, so that the mean of the output bias is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind, tied", [("bert", True), ("roberta", True), ("gpt2", True), ("llama", False),
                                        ("llama", True)])
@pytest.mark.parametrize("rows", [60, 128], ids=["padding-rows-reused", "grown"])
def test_new_rows_start_at_the_mean_and_leave_the_old_logits_unchanged(kind, tied, rows):
    model = _tiny(kind, tied=tied)
    known, new = 56, [56, 57]  # rows 58, 59 are padding rows of the 56-token tokenizer
    x = torch.randint(2, known, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=x).logits
        out = model.get_output_embeddings()
        mean_in = model.get_input_embeddings().weight[:known].mean(0)
        mean_out = out.weight[:known].mean(0)
        mean_bias = out.bias[:known].mean() if out.bias is not None else None
        add_token_rows(model, new, rows, known)
        after = model(input_ids=x).logits
    assert model.config.vocab_size == rows == after.shape[-1]
    filled = new + list(range(60, rows))
    kept = [i for i in range(60) if i not in filled]  # the known tokens' rows and the unused padding rows
    torch.testing.assert_close(after[..., kept], before[..., kept], atol=1e-5, rtol=1e-5)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    torch.testing.assert_close(emb[filled], mean_in.expand(len(filled), -1))
    torch.testing.assert_close(out.weight[filled], mean_out.expand(len(filled), -1))
    assert (out.weight is emb) == tied
    if mean_bias is not None:
        torch.testing.assert_close(out.bias[filled], mean_bias.expand(len(filled)))
    # each new row's logit is the mean of the known tokens' logits (exp(mean z) <= mean exp(z)): it takes at
    # most an average known token's share of the softmax
    mean_logit = before[..., :known].mean(-1, keepdim=True)
    torch.testing.assert_close(after[..., filled], mean_logit.expand(*mean_logit.shape[:-1], len(filled)),
                               atol=1e-5, rtol=1e-5)


def test_a_tokenizer_that_does_not_fit_the_checkpoint_is_refused_before_ray(checkpoints, demo_corpus,
                                                                            tmp_path, capsys):
    import ray

    from ray_lifelong.cli import main

    other = tmp_path / "other_tok"
    checkpoint_tokenizer(demo_texts(demo_corpus)[::2], "llama", vocab_size=280).save_pretrained(other)
    cfg = load_config(None, overrides(demo_corpus, tmp_path, checkpoints["llama"], f"tokenizer.path={other}"))
    with pytest.raises(ConfigError, match=rf"tokenizer\.path \({other}\) does not match the vocabulary"):
        prepare_start(cfg)
    # the command line says so in one line and exits 2, before Ray starts
    (tmp_path / "c.yaml").write_text("run_name: x\n")
    args = ["run", str(tmp_path / "c.yaml"), *overrides(demo_corpus, tmp_path, checkpoints["llama"],
                                                          f"tokenizer.path={other}")]
    assert main(args) == 2 and not ray.is_initialized()
    assert "does not match the vocabulary" in capsys.readouterr().err
    for command in ("pack", "ki", "tune"):  # every command that starts from the checkpoint
        extra = ["data.pretokenize=true"] if command == "pack" else []
        assert main([command, *args[1:], *extra]) == 2 and not ray.is_initialized(), command
        assert "does not match the vocabulary" in capsys.readouterr().err, command
    # the checkpoint's own tokenizer with prompts added elsewhere (a sweep's) fits: prompts may be extra
    mine = load_tokenizer(checkpoints["llama"])
    mine.add_tokens(["<dom:sports>"], special_tokens=True)
    mine.save_pretrained(tmp_path / "with_prompt")
    fits = load_config(None, overrides(demo_corpus, tmp_path / "b", checkpoints["llama"],
                                       f"tokenizer.path={tmp_path / 'with_prompt'}"))
    assert prepare_start(fits)[1] is not None


def test_a_checkpoint_without_a_tokenizer_needs_tokenizer_path(checkpoints, demo_corpus, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoints["llama"] / name, bare / name)
    cfg = load_config(None, overrides(demo_corpus, tmp_path, bare))
    with pytest.raises(ConfigError, match="has no tokenizer .* set tokenizer.path"):
        prepare_start(cfg)
    cfg.tokenizer.path = str(checkpoints["llama"])
    tok_dir, _ = prepare_start(cfg)
    assert load_tokenizer(tok_dir).get_vocab() == load_tokenizer(checkpoints["llama"]).get_vocab()


def test_a_uri_is_read_without_copying_and_copied_once(checkpoints, demo_corpus, tmp_path):
    uri = f"file://{checkpoints['roberta']}"
    saved = inspect_checkpoint(uri)
    assert saved.model_dir == uri and saved.arch == "bert" and saved.model_type == "roberta"
    assert load_config(None, overrides(demo_corpus, tmp_path, uri)).model.arch == "bert"
    local = local_model_dir(saved, tmp_path / "cache")
    assert load_tokenizer(local).get_vocab() == load_tokenizer(checkpoints["roberta"]).get_vocab()
    copied = (tmp_path / "cache" / "source.json").stat().st_mtime_ns
    assert local_model_dir(saved, tmp_path / "cache") == local
    assert (tmp_path / "cache" / "source.json").stat().st_mtime_ns == copied


def test_rows_follow_the_checkpoint_tokenizers_specials(checkpoints, demo_corpus):
    llama, roberta = load_tokenizer(checkpoints["llama"]), load_tokenizer(checkpoints["roberta"])
    spec = pack_spec(llama, 16, "llama")  # every document <s> ... </s>, as Llama saw its texts
    assert spec.doc_prefix == (llama.bos_token_id,) and spec.separator == llama.eos_token_id
    spec = pack_spec(roberta, 16, "bert")  # <s> ... </s> rows, documents separated by </s>
    assert spec.prefix == (roberta.convert_tokens_to_ids("<s>"),) and spec.suffix == (
        roberta.convert_tokens_to_ids("</s>"),) == (spec.separator,)
    gpt2_style = checkpoint_tokenizer(demo_texts(demo_corpus)[:50], "llama")
    gpt2_style.bos_token = gpt2_style.eos_token  # one token is BOS, EOS and separator: no BOS of its own
    assert pack_spec(gpt2_style, 16, "gpt2").doc_prefix == () == document_bos(gpt2_style)
    # a downstream example reads like a pre-training row: prompt, then the document's own BOS
    from ray_lifelong.downstream.tasks import encode_text

    ids = encode_text(llama, "the ball", arch="llama", max_length=16, prompt_id=7)
    assert ids[:2] == [7, llama.bos_token_id] and ids[2:] == llama("the ball", add_special_tokens=False)[
        "input_ids"]


def test_roberta_objective_is_the_full_forward_at_the_masked_positions():
    model = _tiny("roberta")
    ids = torch.randint(5, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    logits, targets = LMObjective(model)(ids, labels)
    torch.testing.assert_close(logits, model(input_ids=ids).logits[:, 3], atol=1e-5, rtol=1e-5)
    assert torch.equal(targets, ids[:, 3])


def test_a_bf16_checkpoint_trains_in_float32(tmp_path):
    model = _tiny("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert next(load_model(str(tmp_path / "bf16")).parameters()).dtype == torch.float32


def test_the_report_shows_the_starting_perplexities_above_stage_0(tmp_path):
    from ray_lifelong.report import write_report

    stage = {"domain": "a", "steps": 1, "tokens": 1, "train_flops": 1.0, "cumulative_flops": 1.0,
             "wall_time_s": 1.0, "data_wait_s": 0.0, "restarts": 0, "bad_records": {},
             "history": [{"step": 1, "loss": 2.0}]}
    summary = {"domains": ["a", "b"], "initial_ppl": [50.0, 60.0], "ppl_matrix": [[10.0, 55.0]],
               "stages": [stage], "AP": [10.0], "AP_arithmetic": [10.0], "AP_plus": [None]}
    write_report(summary, tmp_path)
    table = (tmp_path / "report.md").read_text().split("## Lifelong metrics")[0]
    assert table.index("| before stage 0 (model.init_from) | 50.00 | 60.00 |") < table.index("| 0 (a) |")


def test_a_checkpoint_on_s3_is_inspected_in_place_and_copied_once(checkpoints, demo_corpus, tmp_path):

    from tests.conftest import moto_fs, moto_server

    with moto_server() as endpoint:
        fs = moto_fs(endpoint)
        fs.create_dir("models")
        for f in checkpoints["llama"].iterdir():  # as a run's directory holds its model
            with fs.open_output_stream(f"models/run/final_model/{f.name}", compression=None) as out:
                out.write(f.read_bytes())
        query = f"?endpoint_override={endpoint}&scheme=http&region=us-east-1"
        cfg = load_config(None, overrides(demo_corpus, tmp_path, f"s3://models/run{query}",
                                          "continual.prompts=true"))
        assert cfg.model.arch == "llama" and inspect_checkpoint(cfg.model.init_from).model_dir == (
            f"s3://models/run/final_model{query}")
        tok_dir, _ = prepare_start(cfg)
        source = tmp_path / "run" / "init" / "source"
        assert json.loads((source / "source.json").read_text())["uri"].startswith("s3://models/run/final_model")
        assert load_tokenizer(tok_dir).convert_tokens_to_ids("<dom:sports>") == len(
            load_tokenizer(checkpoints["llama"]))
        copied = (source / "source.json").stat().st_mtime_ns
        prepare_start(cfg)
        assert (source / "source.json").stat().st_mtime_ns == copied
        with pytest.raises(ConfigError, match=r"s3://models/none\?endpoint_override=.*: no config\.json"):
            load_config(None, overrides(demo_corpus, tmp_path, f"s3://models/none{query}"))


def test_a_teacher_with_the_checkpoints_rows_fits_a_run_continuing_it(checkpoints, demo_corpus, tmp_path):
    """The student keeps its checkpoint's vocabulary rows (not the tokenizer's count padded to
    ``model.vocab_multiple``): the checkpoint itself, or a model saved from the same lineage, is a teacher
    with the same rows."""
    from ray_lifelong.distill.teacher import check_teacher_compatible
    from ray_lifelong.models.init_from import student_rows

    cfg = load_config(None, overrides(demo_corpus, tmp_path, checkpoints["llama"]))
    tok_dir, _ = prepare_start(cfg)
    tok = load_tokenizer(tok_dir)
    rows = inspect_checkpoint(str(checkpoints["llama"])).rows
    assert rows != padded_vocab(len(tok), cfg.model.vocab_multiple)  # the rule for a model built from sizes
    assert student_rows(cfg, len(tok)) == rows
    check_teacher_compatible(str(checkpoints["llama"]), tok, "llama", student_rows(cfg, len(tok)))
    with pytest.raises(ValueError, match="KI needs the same tokenizer"):
        check_teacher_compatible(str(checkpoints["llama"]), tok, "llama", rows + 8)
