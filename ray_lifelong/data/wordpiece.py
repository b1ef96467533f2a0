"""A deterministic WordPiece vocabulary trainer: the same words and settings give the same vocabulary.

``tokenizers``' ``WordPieceTrainer`` is BPE training with a ``##`` continuation prefix; it numbers the
``##x`` symbols in the order it meets them in a hash map whose seed changes with every trainer, and it
breaks ties between equally frequent pairs by those numbers, so two trainings on the same text end with
different vocabularies (measured: 13 of 1,285 entries on the ELLE demo). Everything a run computes
follows from its tokenizer, so a run would not be a function of its config and data. This module runs
the same algorithm with every order fixed: symbols are numbered specials first, then the alphabet and
then its ``##`` forms, each sorted by code point; the most frequent pair is merged first and ties go to
the pair of lower ids (the older symbols), as in ``tokenizers``.

Byte-level BPE (GPT-2) needs none of this: its alphabet is fixed and sorted, so ``tokenizers`` trains
it deterministically (a unit test checks both across processes).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable

PREFIX = "##"


def count_words(texts: Iterable[str], normalizer, pre_tokenizer) -> Counter:
    """How often each pre-tokenized word occurs in ``texts`` (after ``normalizer``).

    Text is split at spaces first and each distinct piece normalized and pre-tokenized once: both steps act
    on characters and split at spaces, so the counts are those of the whole texts, several times faster.
    """
    pieces: Counter = Counter()
    for text in texts:
        pieces.update(text.split(" "))
    counts: Counter = Counter()
    for piece, n in pieces.items():
        s = normalizer.normalize_str(piece) if normalizer is not None else piece
        for w, _ in pre_tokenizer.pre_tokenize_str(s):
            counts[w] += n
    return counts


def train_wordpiece_vocab(word_counts: dict[str, int], *, vocab_size: int, specials: list[str],
                          min_frequency: int = 2) -> dict[str, int]:
    """The WordPiece vocabulary (token -> id) learnt from ``word_counts`` by BPE merges.

    The ids are: ``specials`` in their order, every character that starts a word or occurs in one, then
    the ``##`` form of every character that continues a word (both sorted), then one id per merge until
    ``vocab_size`` entries or no pair occurs ``min_frequency`` times.
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> int:
        if token not in vocab:
            vocab[token] = len(vocab)
        return vocab[token]

    for s in specials:
        add(s)
    words = sorted(w for w in word_counts if w)
    freqs = [word_counts[w] for w in words]
    for c in sorted({c for w in words for c in w}):
        add(c)
    for c in sorted({c for w in words for c in w[1:]}):
        add(PREFIX + c)
    names = sorted(vocab, key=vocab.get)
    symbols = [[vocab[w[0]]] + [vocab[PREFIX + c] for c in w[1:]] for w in words]

    pair_count: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for i, (syms, f) in enumerate(zip(symbols, freqs)):
        for pair in zip(syms, syms[1:]):
            pair_count[pair] += f
            where.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in pair_count.items()]
    heapq.heapify(heap)

    while heap and len(vocab) < vocab_size:
        neg, pair = heapq.heappop(heap)
        n = pair_count.get(pair, 0)
        if -neg != n:  # stale: counts changed since it was pushed
            if n > 0:
                heapq.heappush(heap, (-n, pair))
            continue
        if n < min_frequency:
            break
        a, b = pair
        right = names[b][len(PREFIX):] if names[b].startswith(PREFIX) else names[b]
        token = names[a] + right
        new = add(token)
        if new == len(names):
            names.append(token)
        born = set()  # only pairs with the new symbol can have gained count; the rest are re-pushed lazily
        for i in sorted(where.pop(pair, ())):
            syms, f = symbols[i], freqs[i]
            for old in zip(syms, syms[1:]):
                pair_count[old] -= f
            merged, k = [], 0
            while k < len(syms):
                if k + 1 < len(syms) and syms[k] == a and syms[k + 1] == b:
                    merged.append(new)
                    k += 2
                else:
                    merged.append(syms[k])
                    k += 1
            symbols[i] = merged
            for p in zip(merged, merged[1:]):
                pair_count[p] += f
                if new in p:
                    where.setdefault(p, set()).add(i)
                    born.add(p)
        pair_count.pop(pair, None)
        for p in sorted(born):
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return vocab
