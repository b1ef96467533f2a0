"""Domain sources on S3, against an S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import gzip
import json

import pytest

from ray_lifelong.data.sources import DataError, iter_documents, resolve_sources
from tests.conftest import moto_fs, moto_server


@pytest.fixture(scope="module")
def s3_server():
    with moto_server() as endpoint:
        yield endpoint


def test_read_jsonl_gz_shards_from_s3(s3_server):

    fs = moto_fs(s3_server)
    fs.create_dir("corpus")
    for i in range(2):
        with fs.open_output_stream(f"corpus/news/train-{i}.jsonl.gz", compression=None) as f:
            f.write(
                gzip.compress(b"\n".join(json.dumps({"text": f"doc {i}-{j}"}).encode() for j in range(3)))
            )
    with fs.open_output_stream("corpus/news/bad.jsonl", compression=None) as f:
        f.write(b'{"text": "ok"}\n{"oops": 1}\n')
    query = f"?endpoint_override={s3_server}&scheme=http&region=us-east-1"
    files = resolve_sources([f"s3://corpus/news/train-*.jsonl.gz{query}"], "news")
    assert [f.split("?")[0] for f in files] == [
        "s3://corpus/news/train-0.jsonl.gz",
        "s3://corpus/news/train-1.jsonl.gz",
    ]
    assert [d for f in files for d in iter_documents(f)] == [
        f"doc {i}-{j}" for i in range(2) for j in range(3)
    ]
    assert len(resolve_sources([f"s3://corpus/news{query}"], "news")) == 3  # a prefix lists every shard
    with pytest.raises(DataError, match=r"s3://corpus/news/bad\.jsonl.*line 2: record has no 'text'"):
        list(iter_documents(f"s3://corpus/news/bad.jsonl{query}"))
    with pytest.raises(DataError, match="no file matches"):
        resolve_sources([f"s3://corpus/sports/*.jsonl{query}"], "sports")


def test_a_checkpoint_on_s3_keeps_its_uri_and_query(s3_server):
    import pyarrow.fs as pafs

    from ray_lifelong.stage.checkpoint import checkpoint_uri

    storage = f"s3://ckpt/runs?endpoint_override={s3_server}&scheme=http&region=us-east-1"
    fs, root = pafs.FileSystem.from_uri(storage)
    uri = checkpoint_uri(f"{root}/run-stage0-a/checkpoint_0001", fs, storage)
    assert (
        uri
        == f"s3://ckpt/runs/run-stage0-a/checkpoint_0001?endpoint_override={s3_server}&scheme=http&region=us-east-1"
    )
    # the same store again
    assert pafs.FileSystem.from_uri(uri)[1] == "ckpt/runs/run-stage0-a/checkpoint_0001"
    local = pafs.LocalFileSystem()
    assert checkpoint_uri("/tmp/x/checkpoint_1", local, "/tmp/x") == "/tmp/x/checkpoint_1"
    with pytest.raises(ValueError, match="not under the storage path"):
        checkpoint_uri("other/checkpoint_1", fs, storage)
