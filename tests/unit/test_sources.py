"""Bad input: every case gets an error naming the file (and line), or is skipped and counted."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_lifelong.data.sources import DataError, iter_documents, join_uri, resolve_sources


def write_gz(path, lines: list[bytes]):
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


def good(i):
    return json.dumps({"text": f"document {i}"}).encode()


def test_reads_jsonl_gz_text_and_parquet(tmp_path):
    a = write_gz(tmp_path / "a.jsonl.gz", [good(1), b"", good(2)])
    (tmp_path / "b.txt").write_text("line one\n\nline two\n")
    pq.write_table(pa.table({"body": ["p1", None, "p2"]}), tmp_path / "c.parquet")
    assert list(iter_documents(a)) == ["document 1", "document 2"]
    assert list(iter_documents(str(tmp_path / "b.txt"))) == ["line one", "line two"]
    assert list(iter_documents(str(tmp_path / "c.parquet"), text_field="body")) == ["p1", "p2"]


def test_custom_text_field(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"body": "hello", "text": 3}) + "\n")
    assert list(iter_documents(str(p), text_field="body")) == ["hello"]


def test_resolve_globs_dirs_and_missing(tmp_path):
    for name in ("x1.jsonl.gz", "x2.jsonl.gz", "notes.md"):
        (tmp_path / name).write_bytes(b"")
    assert [p.split("/")[-1] for p in resolve_sources([str(tmp_path / "x*.jsonl.gz")], "d")] == [
        "x1.jsonl.gz",
        "x2.jsonl.gz",
    ]
    assert len(resolve_sources([str(tmp_path)], "d")) == 2  # unknown extensions are ignored in a directory
    with pytest.raises(DataError, match=r"domain 'news' train: no file matches .*missing\.jsonl"):
        resolve_sources([str(tmp_path / "missing.jsonl")], "domain 'news' train")


def test_file_uri_listing(tmp_path):
    write_gz(tmp_path / "u.jsonl.gz", [good(1)])
    uris = resolve_sources([f"file://{tmp_path}/*.jsonl.gz"], "d")
    assert uris == [f"file://{tmp_path}/u.jsonl.gz"]
    assert list(iter_documents(uris[0])) == ["document 1"]


CASES = {
    "invalid_json": ([good(1), b'{"text": "unterminated', good(3)], r"line 2: invalid JSON"),
    "missing_field": (
        [good(1), good(2), json.dumps({"body": "x"}).encode()],
        r"line 3: record has no 'text' field",
    ),
    "not_a_string": ([json.dumps({"text": 5}).encode()], r"line 1: field 'text' is int"),
    "non_utf8": ([good(1), b'{"text": "caf\xe9"}'], r"line 2: not valid UTF-8"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_records_error_names_file_and_line(tmp_path, case):
    lines, pattern = CASES[case]
    path = write_gz(tmp_path / f"{case}.jsonl.gz", lines)
    with pytest.raises(DataError, match=rf"{case}\.jsonl\.gz, {pattern}"):
        list(iter_documents(path))


@pytest.mark.parametrize("case", CASES)
def test_bad_records_skipped_and_counted(tmp_path, case):
    lines, _ = CASES[case]
    path = write_gz(tmp_path / f"{case}.jsonl.gz", lines)
    bad = []
    docs = list(iter_documents(path, on_bad_record="skip", report_bad=bad.append))
    assert len(bad) == 1 and bad[0].path == path
    assert len(docs) == len(lines) - 1


def test_truncated_gzip(tmp_path):
    path = write_gz(tmp_path / "t.jsonl.gz", [good(i) for i in range(2000)])
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.jsonl\.gz, line \d+: unreadable or truncated gzip"):
        list(iter_documents(path))
    bad = []
    docs = list(iter_documents(path, on_bad_record="skip", report_bad=bad.append))
    assert 0 < len(docs) < 2000 and len(bad) == 1


def test_not_gzip_at_all(tmp_path):
    path = tmp_path / "fake.jsonl.gz"
    path.write_bytes(b"this is not gzip\n")
    with pytest.raises(DataError, match=r"fake\.jsonl\.gz, line 1: unreadable or truncated gzip"):
        list(iter_documents(str(path)))


def test_parquet_missing_column_and_corrupt(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: Parquet file has no column 'text'"):
        list(iter_documents(str(tmp_path / "c.parquet")))
    (tmp_path / "d.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        list(iter_documents(str(tmp_path / "d.parquet")))


def test_unknown_extension_needs_format(tmp_path):
    (tmp_path / "data.csv").write_text("a\n")
    with pytest.raises(DataError, match=r"data\.csv: cannot tell the format"):
        list(iter_documents(str(tmp_path / "data.csv")))
    assert list(iter_documents(str(tmp_path / "data.csv"), fmt="text")) == ["a"]


def test_join_uri_keeps_the_query_at_the_end():
    q = "endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(f"s3://bucket/runs/?{q}", "tune", "x") == f"s3://bucket/runs/tune/x?{q}"
    assert join_uri("s3://bucket/runs", "tune") == "s3://bucket/runs/tune"
    assert join_uri("/tmp/a?b/", "tune") == "/tmp/a?b/tune"  # a local name may contain '?'


def test_root_cause_finds_the_data_error_or_the_innermost_non_ray_error():
    from ray_lifelong.data.sources import root_cause

    class Wrapper(Exception):  # stands for Ray's own wrappers (RayTaskError, TrainingFailedError)
        pass

    Wrapper.__module__ = "ray.exceptions"

    def chain(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as e:
                raise Wrapper(
                    "Failed to apply UDF\nTo change retry attempts, configure the DataContext"
                ) from e
        except Wrapper as outer:
            return outer

    assert root_cause(chain(DataError("a.jsonl, line 3: invalid JSON"))) == "a.jsonl, line 3: invalid JSON"
    denied = chain(OSError("When creating key 'run/' in bucket 'packs': AWS Error ACCESS_DENIED\nmore"))
    assert root_cause(denied) == "When creating key 'run/' in bucket 'packs': AWS Error ACCESS_DENIED"
    assert root_cause(Wrapper("only\nlast line")) == "last line"


def test_data_error_text_reads_the_error_or_the_wrapper_that_quotes_it():
    from ray_lifelong.data.sources import data_error_text, root_cause

    quoting = RuntimeError(
        "Traceback ...\n  ray_lifelong.data.sources.DataError: b.jsonl, line 9: no text\nmore"
    )
    assert data_error_text(quoting) == "b.jsonl, line 9: no text" == root_cause(quoting)
    try:
        try:
            raise DataError("c.jsonl, line 2: invalid JSON")
        except DataError as inner:
            wrapper = "Traceback\nray_lifelong.data.sources.DataError: c.jsonl, line 2: ..."
            raise RuntimeError(wrapper) from inner
    except RuntimeError as outer:
        assert data_error_text(outer) == "c.jsonl, line 2: invalid JSON"  # the error itself wins
    assert data_error_text(OSError("disk full")) is None
