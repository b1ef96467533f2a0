"""Ray Data pipelines: read a domain's files -> tokenize (actor pool) -> pack into sequences.

The datasets are lazy; they execute while the Ray Train workers pull batches through
``get_dataset_shard(...).iter_torch_batches``, so the corpus is never materialised whole. Only the
small validation rows are read once per run, in the driver (:func:`validation_rows`), and travel to the
workers as arrays.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_lifelong.data.packing import PackSpec, pack
from ray_lifelong.data.sources import BadRecord, DataError, data_error_text, iter_documents, resolve_sources
from ray_lifelong.data.tokenizer import document_bos, load_tokenizer, prompt_token

if TYPE_CHECKING:  # the pipeline's actors import this module: the config (and torch through it) stays out
    from ray_lifelong.config.schema import DataConfig, DomainConfig


@ray.remote(num_cpus=0)
class BadRecordLog:
    """Collects records skipped under ``on_bad_record: skip`` (deduplicated across epochs/retries)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int], str] = {}

    def add(self, records: list[tuple[str, int, str]]) -> None:
        for path, line, reason in records:
            self._seen.setdefault((path, line), reason)

    def summary(self) -> dict:
        by_file: dict[str, int] = {}
        for path, _ in self._seen:
            by_file[path] = by_file.get(path, 0) + 1
        examples = [f"{p}, line {ln}: {r}" for (p, ln), r in list(self._seen.items())[:5]]
        return {"count": len(self._seen), "by_file": by_file, "examples": examples}


def bad_record_log(on_bad_record: str):
    """A :class:`BadRecordLog` on the driver's node, so that it outlives any worker node the run loses;
    None unless ``on_bad_record`` is ``skip`` (under ``error`` a bad record fails the stage instead, and
    the run starts no actor for a log that stays empty)."""
    if on_bad_record != "skip":
        return None
    here = ray.get_runtime_context().get_node_id()
    return BadRecordLog.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()


def _read_files(batch: dict, *, fmt: str, text_field: str, on_bad_record: str, chunk: int, log=None):
    """Generator UDF: one input row per file, streaming blocks of ``chunk`` documents out."""
    for path, domain_id in zip(batch["path"], batch["domain_id"]):
        skipped: list[BadRecord] = []
        texts: list[str] = []

        def block(texts=texts, domain_id=domain_id) -> dict:
            return {"text": np.asarray(texts, dtype=object),
                    "domain_id": np.full(len(texts), domain_id, dtype=np.int32)}

        for text in iter_documents(str(path), fmt=fmt, text_field=text_field,
                                   on_bad_record=on_bad_record, report_bad=skipped.append):
            texts.append(text)
            if len(texts) >= chunk:
                yield block()
                texts.clear()
        if texts:
            yield block()
        if skipped and log is not None:
            # waited on: the driver's summary (from another caller) must see it, and it is one call per file
            ray.get(log.add.remote([(b.path, b.line, b.reason) for b in skipped]))


class TokenizePack:
    """Ray Data callable class: tokenize a batch of documents and pack it into fixed-length rows.

    One instance lives in each actor of the pool, so the tokenizer is loaded once per actor. With
    ``carry`` (a pool of one actor, whose tasks run in stream order), the tokens left over at the end of a
    batch carry into the next one, and the rows are those of packing the whole stream at once. A larger
    pool hands batches to whichever actor is free, so a carry would make the rows depend on that
    assignment: there each batch is packed on its own and its leftover (less than one row) is dropped.

    ``layouts``: the rows' layouts (:func:`pack_layouts`), made where the tokenizer is loaded through
    transformers already; given, this instance encodes with the ``tokenizers`` library alone
    (:func:`encodes_alike`), without importing transformers (~0.5 CPU-s of every tokenizer actor's start).
    """

    def __init__(self, tokenizer_dir: str, seq_len: int, arch: str, prompts: dict[int, str] | None = None,
                 carry: bool = True, layouts: tuple[PackSpec, dict[int, PackSpec]] | None = None) -> None:
        if layouts is None:
            tok = load_tokenizer(tokenizer_dir)
            self.encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
            layouts = pack_layouts(tok, seq_len, arch, prompts)
        else:
            self.encode = backend_encoder(tokenizer_dir)
        # ELLE domain prompts: each domain's rows start with its own prompt token
        self.spec, self.specs = layouts
        self.carry: dict[int, list[int]] = {}
        self.keep_carry = carry

    def __call__(self, batch: dict) -> dict:
        enc = self.encode(list(batch["text"]))
        ids = batch["domain_id"]
        rows, dom = [], []
        for d in dict.fromkeys(ids.tolist()):  # a batch may span two domains (validation): pack each apart
            docs = [e for e, i in zip(enc, ids) if i == d]
            packed, left = pack(docs, self.specs.get(d, self.spec), self.carry.get(d, []))
            if self.keep_carry:
                self.carry[d] = left
            rows.append(packed)
            dom.append(np.full(len(packed), d, dtype=np.int32))
        if not rows:
            return {
                "input_ids": np.zeros((0, self.spec.seq_len), np.int32),
                "domain_id": np.zeros(0, np.int32),
            }
        return {"input_ids": np.concatenate(rows), "domain_id": np.concatenate(dom)}


def pack_layouts(tokenizer, seq_len: int, arch: str, prompts: dict[int, str] | None = None
                 ) -> tuple[PackSpec, dict[int, PackSpec]]:
    """The rows' layout, and each prompted domain's (by domain id) when ``prompts``."""
    return (pack_spec(tokenizer, seq_len, arch),
            {d: pack_spec(tokenizer, seq_len, arch, p) for d, p in (prompts or {}).items()})


def backend_encoder(tokenizer_dir: str):
    """``texts -> token ids`` without special tokens, by the ``tokenizers`` library from the directory's
    ``tokenizer.json``, neither truncated nor padded: what transformers' generic fast tokenizer calls
    (:func:`encodes_alike`)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    backend.no_truncation()
    backend.no_padding()
    return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def backend_layouts(opts: StreamOptions, prompts: dict[int, str] | None):
    """The rows' layouts for tokenizer actors that encode with the ``tokenizers`` library alone, or None when
    that library would not encode as the run's tokenizer does (:func:`encodes_alike`)."""
    path = Path(opts.tokenizer_dir, "tokenizer.json")
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    return _backend_layouts(opts.tokenizer_dir, stamp, opts.data.seq_len, opts.arch,
                            tuple(sorted((prompts or {}).items())))


@functools.lru_cache(maxsize=16)
def _backend_layouts(tokenizer_dir: str, stamp, seq_len: int, arch: str, prompts: tuple):
    """:func:`pack_layouts` for actors that encode with the ``tokenizers`` library, or None when it would
    not encode alike; once per tokenizer file (``stamp``: its modification time and size) in a process,
    which builds a dataset per stage and memory."""
    tok = load_tokenizer(tokenizer_dir)
    if not encodes_alike(tok, tokenizer_dir):
        return None
    return pack_layouts(tok, seq_len, arch, dict(prompts))


def encodes_alike(tokenizer, tokenizer_dir: str) -> bool:
    """Whether :func:`backend_encoder` gives ``tokenizer``'s own ids: it is transformers' generic fast
    tokenizer (no Python-side handling of its own) and its backend is the directory's ``tokenizer.json``."""
    from transformers import PreTrainedTokenizerFast

    path = Path(tokenizer_dir) / "tokenizer.json"
    if type(tokenizer) is not PreTrainedTokenizerFast or not path.is_file():
        return False

    def model(text: str) -> dict:  # (truncation and padding: set by each call, off in both encoders)
        return {k: v for k, v in json.loads(text).items() if k not in ("truncation", "padding")}

    return model(path.read_text()) == model(tokenizer.backend_tokenizer.to_str())


def pack_spec(tokenizer, seq_len: int, arch: str, prompt: str | None = None) -> PackSpec:
    """Row layout per architecture, in the tokenizer's own specials: the masked LMs ``[CLS] (prompt) body
    [SEP]`` (RoBERTa's ``<s> ... </s>``), every document of the body followed by the ``[SEP]``; the causal
    LMs ``(prompt) body``, every document followed by the EOS and, for a tokenizer that starts its texts
    with a BOS of its own (Llama's and Mistral's ``<s>``, unlike GPT-2's ``<|endoftext|>``), preceded by it,
    as the checkpoint saw its texts in pre-training."""
    prompt_ids = (tokenizer.convert_tokens_to_ids(prompt),) if prompt else ()
    if arch == "bert":
        return PackSpec(
            seq_len, tokenizer.sep_token_id, (tokenizer.cls_token_id, *prompt_ids), (tokenizer.sep_token_id,)
        )
    return PackSpec(seq_len, tokenizer.eos_token_id, prompt_ids, (), doc_prefix=document_bos(tokenizer))



@dataclass(frozen=True)
class StreamOptions:
    tokenizer_dir: str
    arch: str
    data: DataConfig


def files_dataset(
    domains: list[tuple[int, DomainConfig]], split: str, opts: StreamOptions, log=None, prompts: bool = False
) -> ray.data.Dataset:
    """The lazy dataset of packed rows ``{input_ids, domain_id}`` of the ``split`` of ``domains``.

    Args:
        domains: ``(domain_id, DomainConfig)`` pairs; ``domain_id`` is the domain's index in the run.
        prompts: start every row with its domain's prompt token ``<dom:NAME>`` (ELLE).

    Raises:
        DataError: a source pattern matches no file (checked here, before any Ray work starts).
    """
    items = []
    for domain_id, dom in domains:
        patterns = dom.train if split == "train" else dom.valid
        if not patterns:
            raise DataError(f"domain {dom.name!r} lists no {split} sources (data.domains[].{split})")
        items += [
            {"path": f, "domain_id": domain_id}
            for f in resolve_sources(patterns, what=f"domain {dom.name!r} {split}")
        ]
    formats = {dom.format for _, dom in domains}
    fields = {dom.text_field for _, dom in domains}
    if len(formats) > 1 or len(fields) > 1:
        raise DataError(
            f"domains {[d.name for _, d in domains]} read together must share format and text_field"
        )
    d = opts.data
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        _read_files,
        batch_size=1,
        num_cpus=d.read_num_cpus,
        fn_kwargs=dict(
            fmt=formats.pop(),
            text_field=fields.pop(),
            on_bad_record=d.on_bad_record,
            chunk=d.read_chunk_docs,
            log=log,
        ),
    )
    carry = carries_tokens(d)
    prompt_names = {i: prompt_token(dom.name) for i, dom in domains} if prompts else None
    layouts = backend_layouts(opts, prompt_names)  # made here: the actors then need the tokenizers library
    return ds.map_batches(
        TokenizePack,
        batch_size=d.tokenize_batch_size,
        num_cpus=d.tokenize_num_cpus,
        # Ray Data lets an actor run the tasks queued on it out of order; a carry needs them in stream order,
        # so the one actor gets one batch at a time (its queue is FIFO; measured free: tokenize_order.md)
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=max(1, d.tokenize_actors), max_tasks_in_flight_per_actor=1 if carry else None
        ),
        fn_constructor_kwargs=dict(
            tokenizer_dir=opts.tokenizer_dir,
            seq_len=d.seq_len,
            arch=opts.arch,
            prompts=prompt_names,
            carry=carry,
            layouts=layouts,
        ),
    )


def carries_tokens(data: DataConfig) -> bool:
    """Whether a batch's leftover tokens carry into the next (one tokenizer actor) or are dropped."""
    return data.tokenize_actors <= 1


@dataclass(frozen=True)
class ValidationRows:
    """Every domain's validation rows in stream order, held as arrays: small (each domain's first
    ``eval_max_sequences`` rows and those between them), shipped to the workers with the stage, so an
    evaluation needs no Ray Data iterator."""

    input_ids: np.ndarray
    """(rows, seq_len)"""
    domain_id: np.ndarray
    """(rows,)"""

    def batches(self, size: int):
        """``{input_ids, domain_id}`` torch batches of ``size`` rows (a last smaller one), in order: the
        batches ``iter_torch_batches(batch_size=size)`` of the same rows would give."""
        import torch

        for s in range(0, len(self.domain_id), size):
            yield {"input_ids": torch.from_numpy(self.input_ids[s : s + size].astype(np.int64)),
                   "domain_id": torch.from_numpy(self.domain_id[s : s + size].astype(np.int64))}


def validation_rows(
    domains: list[DomainConfig], opts: StreamOptions, log=None, prompts: bool = False
) -> ValidationRows:
    """All domains' validation rows, read once per run so that every stage evaluates the same sequences;
    the workers score the first ``eval_max_sequences`` rows of each domain, and the rows after the last of
    those are not kept.

    Read here, in this process, file after file: the validation sets are small, and a Ray Data pipeline
    for them started a tokenizer actor (a new process importing Ray Data and transformers, ~2 CPU-s) and
    cost a run's driver ~3 s before its first stage. The rows are those a stream of the same files gives
    through one tokenizer actor: each domain's documents tokenized and packed as one stream
    (:class:`TokenizePack` with its carry), whatever ``data.tokenize_actors`` the training streams use.

    Raises:
        DataError: a domain lists no validation source, a source matches no file, a record is bad (under
            ``on_bad_record: error``), or a domain's validation text makes no sequence.
    """
    d = opts.data
    packer = TokenizePack(opts.tokenizer_dir, d.seq_len, opts.arch,
                          {i: prompt_token(dom.name) for i, dom in enumerate(domains)} if prompts else None)
    ids, dom_ids = [], []
    for i, dom in enumerate(domains):
        if not dom.valid:
            raise DataError(f"domain {dom.name!r} lists no valid sources (data.domains[].valid)")
        for path in resolve_sources(dom.valid, what=f"domain {dom.name!r} valid"):
            skipped: list[BadRecord] = []
            for rows in file_rows(packer, path, i, dom, d, report_bad=skipped.append):
                ids.append(rows["input_ids"])
                dom_ids.append(rows["domain_id"])
            if skipped and log is not None:
                ray.get(log.add.remote([(b.path, b.line, b.reason) for b in skipped]))
    dom_ids = np.concatenate(dom_ids) if dom_ids else np.zeros(0, np.int32)
    empty = [dm.name for dm, n in zip(domains, np.bincount(dom_ids, minlength=len(domains))) if n == 0]
    if empty:
        raise DataError(
            f"domains {empty}: validation sources hold no text (at least one sequence of "
            f"{opts.data.seq_len} tokens is needed)"
        )
    return scored_rows(np.concatenate(ids), dom_ids, len(domains), d.eval_max_sequences)


def file_rows(packer: TokenizePack, path: str, domain_id: int, dom: DomainConfig, data: DataConfig,
              report_bad=None):
    """The packed rows ``{input_ids, domain_id}`` of one file of ``dom``, in this process: its documents
    tokenized ``data.tokenize_batch_size`` at a time by ``packer``, as the stream's tokenizer actor gets
    them (with a carrying packer, the rows of the file's whole stream)."""
    docs = iter_documents(path, fmt=dom.format, text_field=dom.text_field, on_bad_record=data.on_bad_record,
                          report_bad=report_bad)
    while chunk := list(itertools.islice(docs, data.tokenize_batch_size)):
        yield packer({"text": chunk, "domain_id": np.full(len(chunk), domain_id, dtype=np.int32)})


def beside_driver(fn, *args):
    """``fn(*args)`` in a Ray task on this node that takes no CPU: the Ray Data it starts is driven from
    there, so its processes' console lines pass the driver's filter (:mod:`ray_lifelong.console`) instead
    of reaching the terminal straight from the driver's own core; files it writes to a local path land on
    this node. Bad input found there is raised here as a :class:`DataError` naming the file and line."""
    node = ray.get_runtime_context().get_node_id()
    task = _call.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    try:
        return ray.get(task.remote(fn, *args))
    except ray.exceptions.RayTaskError as e:
        text = data_error_text(e)
        if text:
            raise DataError(text) from None
        raise


@ray.remote(num_cpus=0)
def _call(fn, *args):
    quiet_ray_data()
    return fn(*args)


def scored_rows(ids: np.ndarray, domain_id: np.ndarray, domains: int, cap: int) -> ValidationRows:
    """The rows up to the last one an evaluation scores (each domain's first ``cap``); the rows between
    stay, so the evaluation's batches are those of the whole stream."""
    last = max(int(np.flatnonzero(domain_id == d)[:cap][-1]) for d in range(domains))
    return ValidationRows(np.ascontiguousarray(ids[: last + 1]), np.ascontiguousarray(domain_id[: last + 1]))


def quiet_ray_data() -> None:
    """No progress bars (one log line per interval is the interface, and it reads well in CI logs), and
    a deterministic block order, so that a resumed stage skips exactly the micro-batches it consumed."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.verbose_progress = False
