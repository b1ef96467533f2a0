"""Replay memory: a uniform sample of each finished domain's training sequences, mixed into later stages.

- :func:`write_memory` samples the domain's packed training rows (the rows its stage streams, prompts
  included; a stage shorter than one epoch trains on only a part of them, as in ELLE, whose memory is
  a sample of the domain's corpus) with Ray Data and writes them as Parquet with a completion marker,
  so a resumed run finds the memory and never samples twice. Whether a row is kept depends only on its
  tokens and the seed (:func:`select_rows`), not on how Ray Data cut the stream into blocks, so the same
  config and seed
  give the same memory from the text stream or the packed domain, on any cluster size.
- :func:`read_memories` reads the memories of earlier domains back (small: every worker holds them all).
- :func:`replay_count` and :func:`replay_draw` are the pure per-micro-batch mixing rules the training
  loop uses: how many rows of a micro-batch to replace, and from which memory rows; :func:`memory_epoch`
  deals the memories to the workers as the function-recovering warmup's data.

ELLE (Qin et al., Findings of ACL 2022) replaces whole micro-batches of an accumulation group; replacing rows
of every micro-batch is the same mix in expectation and works for any accumulation, including none.
The draws are seeded by (seed, stage, rank, step, micro-batch), so a resumed stage replays exactly
what it would have.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pyarrow.fs as pafs
import torch

from ray_lifelong.data import markers
from ray_lifelong.data.sources import DataError, filesystem, join_uri

WEIGHTINGS = ("uniform", "proportional")
"""How a replayed row picks its memory: each memory alike, or in proportion to its size."""

MARKER = "_memory.json"


def memory_uri(root: str, index: int, domain: str) -> str:
    return join_uri(root, f"{index:02d}-{domain}")


def read_marker(uri: str) -> dict | None:
    """The memory's record if it was written completely, else ``None``."""
    return markers.read_marker(uri, MARKER)


FAILED = "_failed.json"


def write_failure(uri: str, error: str) -> None:
    """Say at ``uri`` why its memory could not be written: the workers waiting for it stop with this."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    markers.write_marker(uri, FAILED, {"error": error})


def memory_failure(uri: str) -> str | None:
    """The error :func:`write_failure` left at ``uri``, if any."""
    rec = markers.read_marker(uri, FAILED)
    return rec["error"] if rec else None


def clear_failure(uri: str) -> None:
    """Forget an earlier run's failure at ``uri`` before writing the memory again."""
    fs, path = filesystem(uri)
    if fs.get_file_info(f"{path}/{FAILED}").type == pafs.FileType.File:
        fs.delete_file(f"{path}/{FAILED}")


def row_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random number in [0, 1) per row of ``ids`` (rows x tokens), from the row's tokens and
    ``seed`` alone (a keyed BLAKE2b hash)."""
    key = str(seed).encode()
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(np.ascontiguousarray(r).tobytes(), digest_size=8, key=key).digest(), "little"
            )
            / 2.0**64
            for r in ids
        ),
        dtype=np.float64,
        count=len(ids),
    )


def select_rows(batch: dict, *, fraction: float, seed: int) -> dict:
    """The rows of ``batch`` whose key is below ``fraction`` (a uniform sample of that share), with their
    key in ``_key`` (a cap keeps the smallest keys: still uniform, and as independent of the blocks)."""
    keyed = _with_key(batch, seed=seed)
    keep = keyed["_key"] < fraction
    return {k: v[keep] for k, v in keyed.items()}


def _with_key(batch: dict, *, seed: int) -> dict:
    return {**batch, "_key": row_keys(batch["input_ids"], seed)}


def keyed_shuffle(ds, seed: int):
    """``ds``'s rows in the order of their keyed hash: a pseudo-random permutation that depends on the rows
    and ``seed`` alone. ``random_shuffle(seed)`` permutes by block, so its order changes with the block
    layout (text stream vs packed domain, the files a memory was written in); this one does not."""
    return (
        ds.map_batches(_with_key, batch_format="numpy", fn_kwargs={"seed": seed})
        .sort("_key")
        .drop_columns(["_key"])
    )


def write_memory(ds, uri: str, *, fraction: float, max_sequences: int | None, seed: int) -> dict:
    """Sample ``fraction`` of ``ds``'s rows uniformly (capped at ``max_sequences``) into Parquet at ``uri``.

    Idempotent: a memory whose marker exists is returned as is; a partial one (the driver died while
    writing) is written again from scratch.
    """
    done = read_marker(uri)
    if done is not None:
        return done
    t0 = time.perf_counter()
    markers.reset_dir(uri)
    sample = ds.map_batches(select_rows, batch_format="numpy", fn_kwargs={"fraction": fraction, "seed": seed})
    sample = sample.materialize()
    n = sample.count()
    if max_sequences is not None and n > max_sequences:
        # the smallest keys, not the stream's first rows: the capped memory stays a uniform sample
        sample = sample.sort("_key").limit(max_sequences).materialize()
        n = max_sequences
    sample = sample.drop_columns(["_key"])
    if n == 0:
        raise ValueError(
            f"memory {uri}: sampling {fraction:.1%} of the domain kept no sequence; raise "
            f"continual.replay.memory_fraction"
        )
    counts: dict[str, int] = {}

    def count(table) -> None:
        for d, c in zip(*np.unique(table.column("domain_id").to_numpy(), return_counts=True)):
            counts[str(int(d))] = counts.get(str(int(d)), 0) + int(c)

    # files that read back in one order (Ray's write_parquet may interleave), counted per domain as written
    markers.write_in_order(sample, uri, each=count)
    record = {"uri": uri, "sequences": n, "by_domain": counts, "fraction": fraction, "seed": seed,
              "write_s": round(time.perf_counter() - t0, 2)}
    markers.write_marker(uri, MARKER, record)  # last: the memory counts only once complete
    return record


def check_memories(uris: list[str]) -> None:
    """Raise ``FileNotFoundError`` unless every memory in ``uris`` was written completely."""
    missing = [u for u in uris if read_marker(u) is None]
    if missing:
        raise FileNotFoundError(f"replay memories {missing} are missing or incomplete (no {MARKER})")


def read_memories(uris: list[str]) -> tuple[list[torch.Tensor], list[int]]:
    """The given memories as a worker holds them (:func:`memory_pools`), read straight from their Parquet
    files: a few % of each earlier domain, which every worker needs whole, so a Ray dataset (a read task
    per file and an iterator per worker) would only add start-up time."""
    import pyarrow.parquet as pq

    check_memories(uris)
    batches = []
    for uri in uris:
        fs, path = filesystem(uri)
        infos = fs.get_file_info(pafs.FileSelector(path))
        for f in sorted(i.path for i in infos if i.path.endswith(".parquet")):
            table = pq.read_table(f, filesystem=fs)
            ids = tensor_column(table, "input_ids").astype(np.int64)
            domains = table.column("domain_id").to_numpy().astype(np.int64)
            batches.append({"input_ids": torch.from_numpy(ids), "domain_id": torch.from_numpy(domains)})
    return memory_pools(batches)


def replay_count(rows: int, ratio: float, gen: torch.Generator) -> int:
    """How many of a micro-batch's ``rows`` to replace: ``ratio * rows`` with stochastic rounding, so the
    expected share is exactly ``ratio`` even when ``ratio * rows < 1`` (ELLE: int(0.1 * 16 + U(0, 1)))."""
    if ratio <= 0 or rows <= 0:
        return 0
    want = ratio * rows
    base = int(want)
    return min(rows, base + int(torch.rand((), generator=gen).item() < want - base))


def replay_draw(
    pool_sizes: list[int], k: int, gen: torch.Generator, weighting: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` replayed rows: for each, a memory (``uniform`` across memories, or ``proportional`` to their
    sizes) and a row of it, uniformly. Returns ``(pool index (k,), row index (k,))``."""
    sizes = torch.tensor(pool_sizes, dtype=torch.float64)
    if k == 0 or not len(sizes):
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if (sizes <= 0).any():
        raise ValueError(f"empty replay memory among sizes {pool_sizes}")
    weights = torch.ones_like(sizes) if weighting == "uniform" else sizes
    pools = torch.multinomial(weights, k, replacement=True, generator=gen)
    rows = (torch.rand(k, generator=gen, dtype=torch.float64) * sizes[pools]).long()
    return pools, rows


def tensor_column(table, name: str) -> np.ndarray:
    """A column of fixed-length rows (Ray Data writes them as its tensor extension type, a list type
    underneath) as one (rows x length) array, whether or not Ray's extension types are registered."""
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    if isinstance(col, pa.ExtensionArray):
        col = col.storage
    if len(col) == 0:
        return np.zeros((0, 0), dtype=np.int64)
    return col.flatten().to_numpy().reshape(len(col), -1)


def memory_pools(batches) -> tuple[list[torch.Tensor], list[int]]:
    """The replay memories as a worker holds them: one tensor of rows per domain (canonical order, so the
    same memory gives the same pools whatever order its blocks arrive in), and the domain ids, ascending.
    ``batches``: ``{"input_ids", "domain_id"}`` torch batches of the memory dataset."""
    rows: dict[int, list[torch.Tensor]] = {}
    for batch in batches:
        for d in batch["domain_id"].unique().tolist():
            rows.setdefault(int(d), []).append(batch["input_ids"][batch["domain_id"] == d])
    if not rows:
        raise DataError("the replay memories hold no sequence")
    ids = sorted(rows)
    return [canonical_rows(torch.cat(rows[d])) for d in ids], ids


def canonical_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (rows x tokens) sorted lexicographically by their tokens: one order for one set of rows.

    Replay draws and the warmup's epochs pick rows by position; Ray Data hands a dataset's blocks over in
    whatever order its tasks finish, and a memory written from the text stream or from packed rows lands in
    differently cut files. Sorting once at load makes every run on the same memory draw the same rows."""
    if len(rows) < 2:
        return rows
    order = np.lexsort(rows.numpy().T[::-1])  # lexsort's last key is the primary one: the first token
    return rows[torch.from_numpy(order)]


def memory_epoch(memory, *, seed: int, rank: int, world: int, batch_size: int):
    """One epoch of the function-recovering warmup's data on worker ``rank`` of ``world``: every memory row
    once, in an order drawn from ``seed``, dealt to the ranks in equal shares (a remainder left out), in
    micro-batches (a last partial one dropped). ``memory``: ``(rows per domain, domain ids)`` as the loop
    holds it for replay, so the warmup needs no dataset or shuffle of its own."""
    pools, pool_domains = memory
    rows = torch.cat(pools)
    domains = torch.cat([torch.full((len(p),), d, dtype=torch.long) for p, d in zip(pools, pool_domains)])
    share = len(rows) // world
    if share < batch_size:
        raise DataError(
            f"the replay memories hold {len(rows)} sequences: fewer than one micro-batch "
            f"({batch_size}) per worker ({world}) for the function-recovering warmup"
        )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[: share * world]
    mine = order[rank::world]
    for s in range(0, len(mine) - batch_size + 1, batch_size):
        idx = mine[s : s + batch_size]
        yield {"input_ids": rows[idx], "domain_id": domains[idx]}
