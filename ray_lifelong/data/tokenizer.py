"""Train (``tokenizers``) or load a Hugging Face fast tokenizer, with reserved domain-prompt tokens, and the
row conventions read from one (its specials, a BOS before every text).

Nothing is downloaded. Which tokenizer a run uses is decided from its config by
:mod:`ray_lifelong.data.run_tokenizer`; this module imports nothing of the config (nor torch), because the
data pipeline's actors import it to tokenize.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ray_lifelong.data.sources import iter_documents, resolve_sources
from ray_lifelong.data.wordpiece import PREFIX, count_words, train_wordpiece_vocab

if TYPE_CHECKING:
    from ray_lifelong.config.schema import DomainConfig

BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                 "sep_token": "[SEP]", "mask_token": "[MASK]"}
GPT2_EOS = "<|endoftext|>"


PROMPT_PREFIX = "<dom:"


def prompt_token(domain: str) -> str:
    """The reserved vocabulary token of a domain's prompt (ELLE), e.g. ``<dom:news>``."""
    return f"{PROMPT_PREFIX}{domain}>"


def prompt_tokens(domains: Iterable[str], reserved: int = 0) -> list[str]:
    return [prompt_token(d) for d in domains] + [prompt_token(f"reserved{i}") for i in range(reserved)]


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


GENERIC_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""``tokenizer_class`` names of transformers' generic fast tokenizer (one class, two names), the class every
tokenizer this project trains is saved as."""


def load_tokenizer(path: str | os.PathLike):
    """Load a local Hugging Face tokenizer directory (never the Hub), as ``AutoTokenizer`` would.

    A directory saved as the generic fast tokenizer is loaded with that class directly: the class
    ``AutoTokenizer`` resolves it to, without importing ``AutoTokenizer``, whose module reaches torch
    through transformers' model configs (about 1.4 CPU-s in each of the data pipeline's tokenizer actors,
    which need no torch). Any other class (a checkpoint's ``LlamaTokenizer``, ``BertTokenizer``, ...) goes
    through ``AutoTokenizer`` for its own handling.
    """
    if not Path(path, "tokenizer.json").exists() and not Path(path, "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{path}: not a Hugging Face tokenizer directory (no tokenizer.json)")
    config = Path(path, "tokenizer_config.json")
    cls = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if cls in GENERIC_FAST and Path(path, "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

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
