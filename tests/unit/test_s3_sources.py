"""Domain sources on S3, against an S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import time

import pytest

from ray_lifelong.data.sources import DataError, iter_documents, resolve_sources


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(monkeypatch_module):
    pytest.importorskip("moto")  # an extra of [test]; always installed by .ci/run
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch_module.setenv(k, v)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_read_jsonl_gz_shards_from_s3(s3_server):
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", region="us-east-1",
                           access_key="test", secret_key="test", allow_bucket_creation=True)
    fs.create_dir("corpus")
    for i in range(2):
        with fs.open_output_stream(f"corpus/news/train-{i}.jsonl.gz", compression=None) as f:
            f.write(gzip.compress(b"\n".join(json.dumps({"text": f"doc {i}-{j}"}).encode() for j in range(3))))
    with fs.open_output_stream("corpus/news/bad.jsonl", compression=None) as f:
        f.write(b'{"text": "ok"}\n{"oops": 1}\n')
    query = f"?endpoint_override={s3_server}&scheme=http&region=us-east-1"
    files = resolve_sources([f"s3://corpus/news/train-*.jsonl.gz{query}"], "news")
    assert [f.split("?")[0] for f in files] == ["s3://corpus/news/train-0.jsonl.gz", "s3://corpus/news/train-1.jsonl.gz"]
    assert [d for f in files for d in iter_documents(f)] == [f"doc {i}-{j}" for i in range(2) for j in range(3)]
    assert len(resolve_sources([f"s3://corpus/news{query}"], "news")) == 3  # a prefix lists every shard
    with pytest.raises(DataError, match=r"s3://corpus/news/bad\.jsonl.*line 2: record has no 'text'"):
        list(iter_documents(f"s3://corpus/news/bad.jsonl{query}"))
    with pytest.raises(DataError, match="no file matches"):
        resolve_sources([f"s3://corpus/sports/*.jsonl{query}"], "sports")
