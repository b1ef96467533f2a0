"""The tokenizer a run uses, decided from its config before any Ray work: ``tokenizer.path``, the config's
tokenizer trained on a sample of its domains, or the checkpoint's own (``model.init_from``), checked
against the checkpoint's vocabulary. Training and loading themselves are :mod:`ray_lifelong.data.tokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ray_lifelong.config.load import ConfigError
from ray_lifelong.config.schema import LifelongConfig, TokenizerConfig
from ray_lifelong.data.tokenizer import (
    PROMPT_PREFIX,
    ensure_prompt_tokens,
    load_tokenizer,
    prompt_tokens,
    sample_texts,
    train_tokenizer,
)
from ray_lifelong.layout import run_layout
from ray_lifelong.models.arch import is_causal
from ray_lifelong.models.saved import inspect_checkpoint, local_model_dir


def tokenizer_kind(cfg: TokenizerConfig, arch: str) -> str:
    """``tokenizer.kind``; ``auto``: WordPiece for BERT, byte-level BPE for the causal LMs (GPT-2 and Llama
    alike: one ``<|endoftext|>`` is their BOS, EOS and document separator, no pad token)."""
    if cfg.kind != "auto":
        return cfg.kind
    return "bpe" if is_causal(arch) else "wordpiece"


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
