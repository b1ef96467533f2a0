"""A deterministic synthetic multi-domain corpus for the demo and the tests.

Each domain has its own lexicon (hand-picked words plus pseudo-words built from the domain's own
syllables), its own Zipf exponent, sentence templates and document lengths, on top of shared function
words. A model trained on one domain therefore predicts another badly, and forgetting shows in the
perplexity matrix. The same seed always writes byte-identical files.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

_FUNCTION = ["the", "a", "of", "and", "to", "in", "with", "for", "on", "at", "by", "from", "after", "before"]

_LEXICON = {
    "sports": dict(
        nouns="team match goal coach season league player striker referee stadium final trophy keeper "
        "pitch fans title injury transfer derby squad".split(),
        verbs="scored won lost defended passed tackled signed trained celebrated equalised".split(),
        adjs="late decisive home away young unbeaten fierce top tired brilliant".split(),
        syllables="ta ro ki bal go la mun dor vic ster".split(),
        zipf=1.1,
        sent=(6, 12),
        sents=(4, 9),
    ),
    "cooking": dict(
        nouns="pan oven sauce garlic onion butter recipe dough flour pepper salt broth basil "
        "skillet knife simmer lemon cream crust spoon".split(),
        verbs="chopped stirred baked roasted whisked seasoned simmered folded grated served".split(),
        adjs="golden crisp fresh tender creamy smoky sweet bitter warm fragrant".split(),
        syllables="mi sa pe lo cha ru fen oli gar bri".split(),
        zipf=1.0,
        sent=(5, 10),
        sents=(3, 7),
    ),
    "astronomy": dict(
        nouns="star galaxy orbit planet telescope nebula comet photon spectrum redshift quasar "
        "pulsar moon eclipse cluster halo flux dust sky observatory".split(),
        verbs="observed emitted orbited collapsed measured detected expanded rotated absorbed mapped".split(),
        adjs="distant bright massive faint stellar dark cosmic radial infrared compact".split(),
        syllables="xe qua zor neb ion thal pri kep vul cyg".split(),
        zipf=1.3,
        sent=(8, 16),
        sents=(5, 10),
    ),
    "finance": dict(
        nouns="market bond equity yield stock dividend investor bank loan rate inflation asset "
        "fund portfolio credit earnings margin risk debt quarter".split(),
        verbs="rose fell hedged traded borrowed invested priced rallied slumped issued".split(),
        adjs="volatile fiscal quarterly liquid bullish bearish net annual steady leveraged".split(),
        syllables="fin cap tra dex mon ore vest lev arb quo".split(),
        zipf=1.2,
        sent=(7, 14),
        sents=(4, 8),
    ),
    "medicine": dict(
        nouns="patient dose trial symptom therapy tumor protein cell gene lesion biopsy cohort "
        "vaccine enzyme receptor plasma tissue clinic diagnosis antibody".split(),
        verbs=("treated reduced induced diagnosed inhibited expressed infused screened enrolled "
               "relapsed").split(),
        adjs="chronic acute clinical randomized benign systemic renal cardiac viral elevated".split(),
        syllables="cyt ase ome lip hep neu ost myo derm hem".split(),
        zipf=1.15,
        sent=(9, 18),
        sents=(4, 9),
    ),
}
DEMO_DOMAINS = tuple(_LEXICON)


def _pseudo_words(rng: random.Random, syllables: list[str], n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))))
    return sorted(words)


def _zipf_choice(rng: random.Random, words: list[str], exponent: float) -> str:
    weights = [1.0 / (r + 1) ** exponent for r in range(len(words))]
    return rng.choices(words, weights=weights, k=1)[0]


def _sentence(rng: random.Random, lex: dict, pool: dict[str, list[str]]) -> str:
    lo, hi = lex["sent"]
    target = rng.randint(lo, hi)
    words: list[str] = []
    while len(words) < target:
        # a small template grammar: [fn] [adj] noun verb [fn] [adj] noun
        words.append(rng.choice(_FUNCTION[:2]))
        if rng.random() < 0.5:
            words.append(_zipf_choice(rng, pool["adjs"], lex["zipf"]))
        words.append(_zipf_choice(rng, pool["nouns"], lex["zipf"]))
        words.append(_zipf_choice(rng, pool["verbs"], lex["zipf"]))
        words.append(rng.choice(_FUNCTION))
        words.append(_zipf_choice(rng, pool["nouns"], lex["zipf"]))
    text = " ".join(words[:target])
    return text[0].upper() + text[1:] + "."


def generate_documents(domain: str, n_docs: int, seed: int) -> list[str]:
    """Return ``n_docs`` documents of ``domain`` (one of :data:`DEMO_DOMAINS`), deterministically."""
    if domain not in _LEXICON:
        raise ValueError(f"unknown demo domain {domain!r}; choose from {DEMO_DOMAINS}")
    lex = _LEXICON[domain]
    rng = random.Random(f"{seed}:{domain}")
    extra = _pseudo_words(rng, lex["syllables"], 120)
    pool = {
        "nouns": lex["nouns"] + extra[:60],
        "verbs": lex["verbs"] + extra[60:90],
        "adjs": lex["adjs"] + extra[90:],
    }
    docs = []
    for _ in range(n_docs):
        lo, hi = lex["sents"]
        docs.append(" ".join(_sentence(rng, lex, pool) for _ in range(rng.randint(lo, hi))))
    return docs


def write_demo_corpus(
    root: str | os.PathLike,
    domains: list[str] | tuple[str, ...] = DEMO_DOMAINS[:4],
    *,
    train_docs: int = 1200,
    valid_docs: int = 80,
    shards: int = 2,
    seed: int = 0,
) -> dict[str, dict[str, list[str]]]:
    """Write ``<root>/<domain>/{train-NN,valid-00}.jsonl.gz`` unless already there; return the paths.

    Files are written to a temporary name and renamed, so an interrupted write is never mistaken for a
    finished corpus.
    """
    out: dict[str, dict[str, list[str]]] = {}
    for domain in domains:
        ddir = Path(root) / domain
        ddir.mkdir(parents=True, exist_ok=True)
        docs = generate_documents(domain, train_docs + valid_docs, seed)
        splits = {
            "valid": [docs[:valid_docs]],
            "train": [docs[valid_docs + i :: shards] for i in range(shards)],
        }
        out[domain] = {}
        for split, parts in splits.items():
            paths = []
            for i, part in enumerate(parts):
                path = ddir / f"{split}-{i:02d}.jsonl.gz"
                if not path.exists():
                    tmp = path.with_suffix(".tmp")
                    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                        for text in part:
                            f.write((json.dumps({"text": text}) + "\n").encode())
                    os.replace(tmp, path)
                paths.append(str(path))
            out[domain][split] = paths
    return out


def prepare_demo(cfg) -> None:
    """Write the config's demo corpus (``demo.enabled``) where its domains read it; an existing one is
    kept."""
    if cfg.demo.enabled:
        write_demo_corpus(
            cfg.demo.dir,
            cfg.demo.domains,
            train_docs=cfg.demo.train_docs,
            valid_docs=cfg.demo.valid_docs,
            shards=cfg.demo.shards,
            seed=cfg.demo.seed,
        )
