"""Train (``tokenizers``) or load a Hugging Face fast tokenizer, with reserved domain-prompt tokens.

Nothing is downloaded: a tokenizer is trained locally on a sample of the configured domains, loaded from a
local Hugging Face directory, or taken from the checkpoint a run starts from (``model.init_from``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

from ray_lifelong.config.load import ConfigError
from ray_lifelong.config.schema import DomainConfig, LifelongConfig, TokenizerConfig
from ray_lifelong.data.sources import iter_documents, resolve_sources
from ray_lifelong.data.wordpiece import PREFIX, count_words, train_wordpiece_vocab
from ray_lifelong.layout import run_layout
from ray_lifelong.models.arch import is_causal
from ray_lifelong.models.saved import inspect_checkpoint, local_model_dir

BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                 "sep_token": "[SEP]", "mask_token": "[MASK]"}
GPT2_EOS = "<|endoftext|>"


PROMPT_PREFIX = "<dom:"


def prompt_token(domain: str) -> str:
    """The reserved vocabulary token of a domain's prompt (ELLE), e.g. ``<dom:news>``."""
    return f"{PROMPT_PREFIX}{domain}>"


def prompt_tokens(domains: Iterable[str], reserved: int = 0) -> list[str]:
    return [prompt_token(d) for d in domains] + [prompt_token(f"reserved{i}") for i in range(reserved)]


def tokenizer_kind(cfg: TokenizerConfig, arch: str) -> str:
    """``tokenizer.kind``; ``auto``: WordPiece for BERT, byte-level BPE for the causal LMs (GPT-2 and Llama
    alike: one ``<|endoftext|>`` is their BOS, EOS and document separator, no pad token)."""
    if cfg.kind != "auto":
        return cfg.kind
    return "bpe" if is_causal(arch) else "wordpiece"


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    kind: str,
    vocab_size: int,
    prompts: list[str],
    min_frequency: int = 2,
):
    """Train a WordPiece (BERT-style) or byte-level BPE (GPT-2-style) tokenizer and save it. The same
    texts and settings give the same ``tokenizer.json``, in any process.

    Returns:
        The loaded Hugging Face tokenizer of ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        specials = list(BERT_SPECIALS.values()) + prompts
        normalizer = normalizers.BertNormalizer(lowercase=True)
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        # our own trainer, not tokenizers' WordPieceTrainer: that one breaks ties in hash-map order, so the
        # same sample gave a different vocabulary each time (see data/wordpiece.py)
        vocab = train_wordpiece_vocab(count_words(texts, normalizer, pre_tokenizer), vocab_size=vocab_size,
                                      specials=specials, min_frequency=min_frequency)
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=PREFIX))
        tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
        tok.add_special_tokens(specials)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=prompts,
                                     model_max_length=1 << 20, **BERT_SPECIALS)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=[GPT2_EOS] + prompts,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=prompts,
                                     bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS,
                                     model_max_length=1 << 20)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} (wordpiece or bpe)")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike):
    """Load a local Hugging Face tokenizer directory (never the Hub)."""
    from transformers import AutoTokenizer

    if not Path(path, "tokenizer.json").exists() and not Path(path, "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{path}: not a Hugging Face tokenizer directory (no tokenizer.json)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def ensure_prompt_tokens(tokenizer, domains: Iterable[str]) -> int:
    """Add missing ``<dom:NAME>`` tokens to a loaded tokenizer; return how many were added."""
    missing = [t for t in prompt_tokens(domains) if tokenizer.convert_tokens_to_ids(t) in
               (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return len(missing)


def sample_texts(domains: list[DomainConfig], docs_per_domain: int) -> Iterable[str]:
    """The first ``docs_per_domain`` documents of each domain's training sources (bad records skipped)."""
    for dom in domains:
        files = resolve_sources(dom.train, what=f"domain {dom.name!r} train")
        docs = itertools.chain.from_iterable(
            iter_documents(f, fmt=dom.format, text_field=dom.text_field, on_bad_record="skip")
            for f in files)
        yield from itertools.islice(docs, docs_per_domain)


def document_bos(tokenizer) -> tuple[int, ...]:
    """``(bos,)`` when the tokenizer puts a BOS other than its EOS before every text (Llama's and Mistral's
    ``<s>``), else ``()`` (GPT-2's ``<|endoftext|>`` is BOS and EOS alike, the trained BPE's too)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos == getattr(tokenizer, "eos_token_id", None):
        return ()
    return (bos,) if tokenizer("a")["input_ids"][:1] == [bos] else ()


def special_token_ids(tokenizer) -> list[int]:
    """Ids never selected for MLM masking (specials and prompts)."""
    return sorted(set(tokenizer.all_special_ids))


def train_config_tokenizer(cfg: LifelongConfig, out_dir: str | os.PathLike):
    """Train the config's tokenizer on a sample of its domains, with a prompt token per domain."""
    tc = cfg.tokenizer
    return train_tokenizer(
        sample_texts(cfg.data.domains, tc.sample_docs_per_domain),
        out_dir,
        kind=tokenizer_kind(tc, cfg.model.arch),
        vocab_size=tc.vocab_size,
        prompts=prompt_tokens([d.name for d in cfg.data.domains], tc.reserved_prompt_tokens),
        min_frequency=tc.min_frequency,
    )


def prepare_tokenizer(cfg: LifelongConfig, out_dir: str | os.PathLike) -> str:
    """``tokenizer.path``, or the config's tokenizer trained into ``out_dir`` (once: a finished one is
    kept); with ``model.init_from``, the checkpoint's (:func:`checkpoint_tokenizer`)."""
    if cfg.model.init_from:
        return checkpoint_tokenizer(cfg, out_dir)
    if cfg.tokenizer.path:
        load_tokenizer(cfg.tokenizer.path)  # fail early with a clear message
        return cfg.tokenizer.path
    if not Path(out_dir, "tokenizer.json").exists():
        train_config_tokenizer(cfg, out_dir)
    return str(out_dir)


def checkpoint_tokenizer(cfg: LifelongConfig, out_dir: str | os.PathLike) -> str:
    """The tokenizer of a run that starts from ``model.init_from``, saved into ``out_dir``: the checkpoint's
    own, or ``tokenizer.path``'s checked against it, with a ``<dom:NAME>`` token per domain added when
    ``continual.prompts`` is on (their embedding rows are added by
    :func:`ray_lifelong.models.init_from.prepare_start_model`). Nothing is trained.

    Raises:
        ConfigError: naming the key: the checkpoint has no tokenizer and ``tokenizer.path`` is unset, the
            tokenizer's vocabulary does not fit the checkpoint's embeddings, or it lacks a special token the
            architecture's rows need (an EOS for the causal LMs; CLS, SEP and MASK for the masked LMs).
    """
    saved = inspect_checkpoint(cfg.model.init_from)
    known = checkpoint_vocab(cfg)
    tok = load_tokenizer(cfg.tokenizer.path) if cfg.tokenizer.path else _own_tokenizer(cfg)
    where = f"tokenizer.path ({cfg.tokenizer.path})" if cfg.tokenizer.path else \
        f"model.init_from's tokenizer ({saved.model_dir})"
    vocab = tok.get_vocab()
    moved = sorted(t for t, i in known.items() if vocab.get(t) != i)
    extra = sorted(t for t in vocab if t not in known and not t.startswith(PROMPT_PREFIX))
    if moved or extra:
        raise ConfigError(f"{where} does not match the vocabulary model.init_from ({saved.model_dir}) was "
                          f"trained with: {len(moved)} of its tokens have other ids or are missing "
                          f"{moved[:5]}, {len(extra)} tokens are extra {extra[:5]}")
    if len(known) > saved.rows:
        raise ConfigError(f"{where} has {len(known)} tokens but model.init_from ({saved.model_dir}) has only "
                          f"{saved.rows} embedding rows")
    needs = ("eos_token",) if is_causal(cfg.model.arch) else ("cls_token", "sep_token", "mask_token")
    missing = [n for n in needs if getattr(tok, f"{n}_id") is None]
    if missing:
        raise ConfigError(f"{where} has no {', '.join(missing)}, which {cfg.model.arch} training needs "
                          "to lay out its rows")
    if cfg.continual.prompts:
        ensure_prompt_tokens(tok, [d.name for d in cfg.data.domains])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return str(out_dir)


def checkpoint_vocab(cfg: LifelongConfig) -> dict[str, int]:
    """Token -> id of the vocabulary ``model.init_from`` was trained with: its own tokenizer's, or (a
    checkpoint saved without one) ``tokenizer.path``'s. A run's tokens outside it are new and get new
    embedding rows."""
    if inspect_checkpoint(cfg.model.init_from).has_tokenizer:
        return _own_tokenizer(cfg).get_vocab()
    if not cfg.tokenizer.path:
        raise ConfigError(f"model.init_from: {inspect_checkpoint(cfg.model.init_from).model_dir} has no "
                          "tokenizer (tokenizer.json): set tokenizer.path to the tokenizer it was trained "
                          "with")
    return load_tokenizer(cfg.tokenizer.path).get_vocab()


def _own_tokenizer(cfg: LifelongConfig):
    """The tokenizer saved with ``model.init_from`` (a URI's copied once into the run directory)."""
    saved = inspect_checkpoint(cfg.model.init_from)
    return load_tokenizer(local_model_dir(saved, run_layout(cfg).init / "source"))
