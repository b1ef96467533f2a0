"""Find and read the text of a domain's source files: local paths, globs, directories or URIs.

Reading is plain Python over pyarrow filesystems, so it runs the same inside a Ray Data task, in the
tokenizer trainer and in tests. Every malformed record raises :class:`DataError` naming the file and
line, or is skipped and reported when ``on_bad_record="skip"``.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

FORMATS = ("jsonl", "parquet", "text")
ON_BAD_RECORD = ("error", "skip")
"""A bad record stops the run naming its file and line, or is skipped and reported."""
_EXTENSIONS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl",
    ".parquet": "parquet", ".txt": "text", ".txt.gz": "text", ".text": "text",
}


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and line where there is one)."""


def _exception_chain(e: BaseException):
    """Every exception reachable from ``e``: causes, contexts, Ray's ``cause`` and Train's per-worker
    failures (a worker's error reaches the driver wrapped several levels deep)."""
    seen, stack = set(), [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        stack.extend([cur.__cause__, cur.__context__, getattr(cur, "cause", None)])
        stack.extend((getattr(cur, "worker_failures", None) or {}).values())


_DATA_MARKER = "DataError:"


def data_error_text(e: BaseException) -> str | None:
    """The message of a DataError anywhere in ``e``'s chain, without the class name; None if there is
    none. The DataError itself is preferred; a wrapper that only quotes it in its traceback text (Ray's
    task errors) is read after its last ``DataError:``."""
    quoted = None
    for cur in _exception_chain(e):
        # by name: Ray's dual class RayTaskError(DataError) is also an instance, with a traceback as text
        if type(cur).__name__ == "DataError" and str(cur).strip():
            return str(cur).strip().splitlines()[0]
        text = str(cur)
        if _DATA_MARKER in text:
            quoted = text[text.rindex(_DATA_MARKER) + len(_DATA_MARKER):].strip().splitlines()[0]
    return quoted


def root_cause(e: BaseException) -> str:
    """The innermost message of a chain of Ray/Train exceptions: our DataError's text if there is one,
    else the first line of the innermost exception that is not Ray's own wrapper (an ``OSError`` from
    storage)."""
    data = data_error_text(e)
    if data:
        return data
    inner = None
    for cur in _exception_chain(e):
        if not type(cur).__module__.startswith("ray.") and str(cur).strip():
            inner = str(cur)
    if inner:
        return inner.strip().splitlines()[0]
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


@dataclass(frozen=True)
class BadRecord:
    """A record dropped under ``on_bad_record="skip"``."""

    path: str
    line: int
    reason: str


def _is_uri(path: str) -> bool:
    return "://" in path


def detect_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    name = _name(path).lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSIONS[ext]
    raise DataError(f"{path}: cannot tell the format from the extension; set the domain's 'format' "
                    f"to one of {FORMATS}")


def _name(path: str) -> str:
    """The path without a URI's ``?query`` (S3 options such as endpoint_override)."""
    return path.split("?", 1)[0] if _is_uri(path) else path


def join_uri(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI; a URI's ``?query`` (endpoint_override, region) stays at
    the end, where pyarrow reads it, instead of being split by the joined parts."""
    base, sep, query = root.partition("?") if _is_uri(root) else (root, "", "")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if _is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot open ({e})") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


def resolve_sources(patterns: list[str], what: str) -> list[str]:
    """Expand paths, globs and directories into a sorted list of files.

    Raises:
        DataError: a pattern matches nothing (naming the pattern and ``what``).
    """
    files: list[str] = []
    for pattern in patterns:
        matched = _expand(pattern)
        if not matched:
            raise DataError(f"{what}: no file matches {pattern!r}")
        files.extend(matched)
    return sorted(dict.fromkeys(files))


def _expand(pattern: str) -> list[str]:
    if _is_uri(pattern):
        return _expand_uri(pattern)
    if any(c in pattern for c in "*?["):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if os.path.isdir(pattern):
        return sorted(os.path.join(root, f) for root, _, names in os.walk(pattern) for f in names
                      if _known_extension(f))
    return [pattern] if os.path.isfile(pattern) else []


def _expand_uri(pattern: str) -> list[str]:
    """Expand ``scheme://...`` with ``*``/``[...]`` globs; a ``?query`` (e.g. endpoint_override) is kept."""
    scheme, rest = pattern.split("://", 1)
    rest, _, query = rest.partition("?")
    suffix = f"?{query}" if query else ""
    glob_at = min((rest.find(c) for c in "*[" if c in rest), default=-1)
    base_rest = rest if glob_at < 0 else rest[:glob_at].rsplit("/", 1)[0]
    try:
        fs, fs_base = pafs.FileSystem.from_uri(f"{scheme}://{base_rest}{suffix}")
        if glob_at < 0:
            info = fs.get_file_info(fs_base)
            if info.type == pafs.FileType.File:
                return [pattern]
            if info.type != pafs.FileType.Directory:
                return []
        listing = fs.get_file_info(pafs.FileSelector(fs_base, recursive=True, allow_not_found=True))
    except (OSError, ValueError) as e:
        raise DataError(f"{pattern}: cannot list ({e})") from None
    fs_pattern = fs_base + rest[len(base_rest):]

    def keep(path: str) -> bool:
        return fnmatch.fnmatch(path, fs_pattern) if glob_at >= 0 else _known_extension(path)

    return sorted(f"{scheme}://{base_rest}{i.path[len(fs_base):]}{suffix}" for i in listing
                  if i.type == pafs.FileType.File and keep(i.path))


def _known_extension(name: str) -> bool:
    low = name.lower()
    return any(low.endswith(ext) for ext in _EXTENSIONS)


def iter_documents(
    path: str,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    on_bad_record: str = "error",
    report_bad: Callable[[BadRecord], None] | None = None,
) -> Iterator[str]:
    """Yield the non-empty document texts of one file.

    Args:
        path: local path or URI of one file.
        fmt: ``auto``, ``jsonl``, ``parquet`` or ``text``.
        text_field: JSON field or Parquet column with the text.
        on_bad_record: ``error`` raises :class:`DataError`; ``skip`` drops the record and calls
            ``report_bad``.
    """
    fmt = detect_format(path, fmt)

    def bad(line: int, reason: str) -> None:
        where = f"{path}, line {line}" if line else path
        if on_bad_record != "skip":
            raise DataError(f"{where}: {reason}")
        if report_bad is not None:
            report_bad(BadRecord(path, line, reason))

    if fmt == "parquet":
        yield from _iter_parquet(path, text_field, bad)
    else:
        yield from _iter_lines(path, fmt, text_field, bad)


def _open_binary(path: str):
    fs, fs_path = filesystem(path)
    try:
        raw = fs.open_input_stream(fs_path, compression=None)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{path}: cannot open: {e}") from None
    if _name(path).lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def _decoded_lines(path: str, bad: Callable[[int, str], None]) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of the non-blank lines of a (gzipped) text file; unreadable ones go to
    ``bad``."""
    stream = _open_binary(path)
    lineno = 0
    try:
        lines = _binary_lines(stream)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
                bad(lineno + 1, f"unreadable or truncated gzip after line {lineno} ({e})")
                return
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if line.strip():
                yield lineno, line
    finally:
        stream.close()


def _json_records(path: str, bad: Callable[[int, str], None]) -> Iterator[tuple[int, dict]]:
    for lineno, line in _decoded_lines(path, bad):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad(lineno, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            bad(lineno, f"record is a JSON {type(record).__name__}, not an object")
            continue
        yield lineno, record


def _iter_lines(path: str, fmt: str, text_field: str, bad: Callable[[int, str], None]) -> Iterator[str]:
    if fmt == "text":
        for _, line in _decoded_lines(path, bad):
            yield line.rstrip("\n")
        return
    for lineno, record in _json_records(path, bad):
        if text_field not in record:
            bad(lineno, f"record has no {text_field!r} field")
            continue
        text = record[text_field]
        if not isinstance(text, str):
            bad(lineno, f"field {text_field!r} is {type(text).__name__}, not a string")
            continue
        if text.strip():
            yield text


def iter_records(path: str, fields: tuple[str, ...], *, fmt: str = "auto") -> Iterator[tuple[int, dict]]:
    """``(line or row number, {field: value})`` of every record of a JSON-lines or Parquet file that must
    carry ``fields`` (labelled tasks: text and label). A missing field is a :class:`DataError` naming the
    file and line."""
    fmt = detect_format(path, fmt)

    def bad(line: int, reason: str) -> None:
        raise DataError(f"{path}, line {line}: {reason}" if line else f"{path}: {reason}")

    if fmt == "parquet":
        import pyarrow.parquet as pq

        fs, fs_path = filesystem(path)
        try:
            table = pq.read_table(fs.open_input_file(fs_path))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        missing = [f for f in fields if f not in table.column_names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (columns: {table.column_names})")
        for i, row in enumerate(table.select(list(fields)).to_pylist(), start=1):
            yield i, row
        return
    if fmt != "jsonl":
        raise DataError(f"{path}: labelled records need JSON lines or Parquet, not {fmt}")
    for lineno, record in _json_records(path, bad):
        missing = [f for f in fields if f not in record]
        if missing:
            bad(lineno, f"record has no {missing[0]!r} field")
        yield lineno, {f: record[f] for f in fields}


def _binary_lines(stream) -> Iterator[bytes]:
    """Lines of a binary stream: gzip files line by line (so the lines before a truncation still
    count), pyarrow streams (no readline) split from 1 MiB reads."""
    if isinstance(stream, gzip.GzipFile):
        for line in stream:
            yield line.rstrip(b"\n")
        return
    pending = b""
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        yield pending


def _iter_parquet(path: str, text_field: str, bad: Callable[[int, str], None]) -> Iterator[str]:
    import pyarrow.parquet as pq

    fs, fs_path = filesystem(path)
    try:
        pfile = pq.ParquetFile(fs.open_input_file(fs_path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in pfile.schema_arrow.names:
        raise DataError(
            f"{path}: Parquet file has no column {text_field!r} (columns: {pfile.schema_arrow.names})"
        )
    row = 0
    for batch in pfile.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                continue
            if not isinstance(value, str):
                bad(row, f"column {text_field!r} holds {type(value).__name__}, not a string")
                continue
            if value.strip():
                yield value
