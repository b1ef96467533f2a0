"""Tokenize once: a domain's training text packed into Parquet rows, streamed by every later read.

Without it (``data.pretokenize: false``) every read of a domain's training split runs its text files
through the tokenizer actor pool again: each epoch of a stage that outlasts its domain, each stage of a
``joint`` run (which re-trains every earlier domain), the memory sample after the stage, and every trial
of a sweep. With it, the domain is packed once into ``<packed_path>/<index>-<name>-<key>/`` and those
reads stream the packed rows, which costs only Parquet I/O. The rows are written in the stream's order (the
tokenizer actors still run in parallel; the driver writes numbered files): Ray Data's ``write_parquet``
hands a write task's blocks to pyarrow's threaded ``write_dataset``, which may interleave them, and a
packed domain must yield exactly the rows, in the order, that its text stream yields.

The directory name carries a hash of everything the rows depend on (the source files with their sizes and
modification times, the tokenizer, ``seq_len``, the architecture's row layout, the domain prompt), so a
changed input packs anew instead of silently reusing stale rows, and runs that agree on all of it (the
methods of a benchmark, the trials of a sweep) can share one ``packed_path``. A domain is packed into a
temporary directory and moved into place with its marker, so a run that dies while packing leaves
nothing half-written where readers look; drivers that pack the same key at once waste work, not rows.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from ray_lifelong.config.schema import DomainConfig
from ray_lifelong.data import markers
from ray_lifelong.data.sources import DataError, filesystem, join_uri, resolve_sources, root_cause
from ray_lifelong.data.stream import StreamOptions, beside_driver, carries_tokens, files_dataset
from ray_lifelong.data.tokenizer import prompt_token

MARKER = "_packed.json"
# bumped when the layout of a packed directory changes, so that packs written before are packed anew
# (2: rows in stream order; version 1 could hold a write task's blocks interleaved)
LAYOUT_VERSION = 2


def packing_key(dom: DomainConfig, opts: StreamOptions, prompts: bool) -> dict:
    """What a domain's packed rows depend on (its sources resolved now, so a new shard changes the key)."""
    sources = []
    for path in resolve_sources(dom.train, what=f"domain {dom.name!r} train"):
        fs, p = filesystem(path)
        info = fs.get_file_info(p)
        sources.append([path, info.size, info.mtime_ns if info.type == pafs.FileType.File else None])
    tok = Path(opts.tokenizer_dir)
    tok_files = sorted(tok.glob("*.json")) + sorted(tok.glob("*.txt"))
    return {
        "sources": sources,
        "format": dom.format,
        "text_field": dom.text_field,
        "tokenizer": hashlib.sha256(
            b"".join(f.name.encode() + f.read_bytes() for f in tok_files)
        ).hexdigest(),
        "seq_len": opts.data.seq_len,
        "arch": opts.arch,
        "carry": carries_tokens(opts.data),
        "prompt": prompt_token(dom.name) if prompts else None,
        "layout": LAYOUT_VERSION,
    }


def packed_name(index: int, dom: DomainConfig, key: dict) -> str:
    """``<index>-<name>-<hash of key>``: the domain's directory under the packed root."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{index:02d}-{dom.name}-{digest}"


def pack_domain(
    index: int, dom: DomainConfig, opts: StreamOptions, root: str, *, prompts: bool, log=None
) -> dict:
    """Pack ``dom``'s training split (domain id ``index``) into Parquet under ``root`` unless it is there.

    Returns the record ``{uri, rows, tokens, ...}`` that :func:`packed_dataset` reads.

    Raises:
        DataError: a source is missing, holds a bad record (under ``on_bad_record: error``: the message
            names the file and line), or packs into no sequence.
    """
    key = packing_key(dom, opts, prompts)
    uri = join_uri(root, packed_name(index, dom, key))
    done = markers.read_marker(uri, MARKER)
    if done is not None and done.get("key") == key:
        return done
    # written aside and moved into place complete, so a reader never sees a partial domain, and two
    # drivers packing the same key at once both end with one (the first move wins)
    tmp = join_uri(root, f"{packed_name(index, dom, key)}.tmp-{uuid.uuid4().hex[:8]}")
    t0 = time.perf_counter()
    print(f"[data] packing domain {dom.name!r} once -> {uri}")
    try:
        rows = beside_driver(markers.write_in_order,
                             files_dataset([(index, dom)], "train", opts, log=log, prompts=prompts), tmp)
    except Exception as e:  # a bad record surfaces wrapped in Ray Data's task errors
        markers.remove_dir(tmp)
        raise DataError(f"packing domain {dom.name!r}: {root_cause(e)}") from e
    if rows == 0:
        markers.remove_dir(tmp)
        raise DataError(
            f"domain {dom.name!r}: its training sources {dom.train} hold no sequence of "
            f"{opts.data.seq_len} tokens"
        )
    record = {
        "uri": uri,
        "domain": dom.name,
        "index": index,
        "rows": rows,
        "tokens": rows * opts.data.seq_len,
        "pack_s": round(time.perf_counter() - t0, 2),
        "key": key,
    }
    markers.write_marker(tmp, MARKER, record)
    if not markers.move_dir(tmp, uri, MARKER):  # another driver finished first: use its rows
        markers.remove_dir(tmp)
        return markers.read_marker(uri, MARKER)
    print(f"[data] packed {dom.name!r}: {rows} sequences in {record['pack_s']} s")
    return record


def packed_dataset(records: list[dict], num_cpus: float = 1.0):
    """The packed rows ``{input_ids, domain_id}`` of the given domains, in their packing order; each read
    task takes ``num_cpus`` (``data.read_num_cpus``, as the text reads)."""
    missing = [r["uri"] for r in records if markers.read_marker(r["uri"], MARKER) is None]
    if missing:
        raise FileNotFoundError(f"packed domains {missing} are missing or incomplete (no {MARKER})")
    return read_parquet_in_order([r["uri"] for r in records], num_cpus)


def read_parquet_in_order(uris: list[str], num_cpus: float = 1.0):
    """The rows of the Parquet files under ``uris`` as a Ray dataset, file by file in name order (what
    :func:`~ray_lifelong.data.markers.write_in_order` wrote)."""
    import ray.data

    # Ray 2.60 reads Parquet through its V2 datasource by default, whose file-listing task took ~4 s of
    # mostly idle wall time before the first rows of every read here (a stage's stream, a memory sample),
    # against ~0.1 s for V1 (bench/results/parquet_read.md); V1 reads the same rows in the same order.
    # The choice is made when the read is planned, so the context is switched for this call only.
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(uris, file_extensions=["parquet"], num_cpus=num_cpus)
    finally:
        ctx.use_datasource_v2 = v2


def training_rows(
    domains: list[tuple[int, DomainConfig]], opts: StreamOptions, *, prompts: bool, packed_root: str, log=None
):
    """The training rows of ``domains``: streamed from the text files, or, with ``data.pretokenize``,
    from the packed domains under ``packed_root`` (each packed on first use)."""
    if not opts.data.pretokenize:
        return files_dataset(domains, "train", opts, log=log, prompts=prompts)
    return packed_dataset(
        [pack_domain(i, dom, opts, packed_root, prompts=prompts, log=log) for i, dom in domains],
        num_cpus=opts.data.read_num_cpus,
    )
