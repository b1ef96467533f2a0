"""Shared fixtures: tiny configs and synthetic shards, offline."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import settings

# CI (.ci/run sets HYPOTHESIS_PROFILE=ci) draws the same examples every run, so that a red CI means a
# changed code path, not a new random draw; local runs keep exploring
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# under pytest-xdist each worker's Ray clusters live in a temp root of their own: `ray.init()` and the CLI's
# "join the cluster `ray start` left on this machine" then never find another worker's cluster
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = f"/tmp/ray-{os.environ['PYTEST_XDIST_WORKER']}"
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as the CLI on local clusters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """Two small demo domains written once per test session."""
    from ray_lifelong.data.demo import write_demo_corpus

    root = tmp_path_factory.mktemp("demo")
    write_demo_corpus(root, ["sports", "astronomy"], train_docs=160, valid_docs=20, shards=2)
    return root


def tiny_overrides(root: Path, out: Path, arch: str = "bert", steps: int = 12) -> list[str]:
    doms = ", ".join(
        f"{{name: {d}, train: ['{root}/{d}/train-*.jsonl.gz'], valid: ['{root}/{d}/valid-*.jsonl.gz']}}"
        for d in ("sports", "astronomy"))
    return [
        f"output_dir={out}", f"data.domains=[{doms}]", "data.seq_len=32", "data.eval_max_sequences=16",
        f"model.arch={arch}", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
        "model.intermediate_size=64", "model.max_position_embeddings=64",
        "tokenizer.vocab_size=600", "tokenizer.sample_docs_per_domain=150",
        f"train.steps={steps}", "train.batch_size=8", "train.micro_batch_size=4", "train.lr=3e-3",
        "train.log_every=2", "train.checkpoint_every=4", "train.warmup_ratio=0.1",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "ray.max_failures=1",
    ]


def one_domain(root: Path) -> str:
    """The override that keeps only the demo's ``sports`` domain (tests of one stage's worth of pipeline)."""
    return (f"data.domains=[{{name: sports, train: ['{root}/sports/train-*.jsonl.gz'], "
            f"valid: ['{root}/sports/valid-*.jsonl.gz']}}]")


def elle_overrides(root, out, *extra) -> list[str]:
    """Two demo domains with ELLE's pieces on: growth before the second, FRW, replay and prompts."""
    doms = (
        f"[{{name: sports, train: ['{root}/sports/train-*.jsonl.gz'], "
        f"valid: ['{root}/sports/valid-*.jsonl.gz']}}, "
        f"{{name: astronomy, train: ['{root}/astronomy/train-*.jsonl.gz'], "
        f"valid: ['{root}/astronomy/valid-*.jsonl.gz'], "
        f"grow: {{num_layers: 2, hidden_size: 64, intermediate_size: 128}}}}]"
    )
    return tiny_overrides(root, out, steps=8) + [
        f"data.domains={doms}",
        "continual.prompts=true",
        "continual.replay.enabled=true",
        "continual.replay.memory_fraction=0.3",
        "continual.replay.ratio=0.25",
        "continual.frw.steps=3",
        "continual.frw.warmup_steps=1",
        "run_name=elle",
        *extra,
    ]


def demo_texts(root: Path, domains=("sports", "astronomy")) -> list[str]:
    """The training documents of demo domains written by :func:`write_demo_corpus`."""
    from ray_lifelong.data.sources import iter_documents, resolve_sources

    return [t for d in domains for f in resolve_sources([f"{root}/{d}/train-*.jsonl.gz"], d)
            for t in iter_documents(f)]


def checkpoint_tokenizer(texts: list[str], style: str, vocab_size: int = 300):
    """A byte-level BPE tokenizer in a published family's conventions, trained on ``texts`` (offline):
    ``llama``: ``<unk> <s> </s>``, every text starts with ``<s>`` (a BOS other than the EOS ``</s>``);
    ``roberta``: ``<s> <pad> </s> <unk> <mask>`` (padding index 1), texts wrapped as ``<s> ... </s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"llama": ["<unk>", "<s>", "</s>"],
                "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]}[style]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = {t: specials.index(t) for t in specials}
    if style == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", ids["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   cls_token="<s>", sep_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   mask_token="<mask>")


def save_checkpoint_dir(out: Path, texts: list[str], style: str, seed: int = 0) -> Path:
    """A tiny published-style checkpoint (random weights, its own tokenizer) saved as a Hugging Face model
    directory: ``llama`` a 1-layer Llama (hidden 32, 2 heads over 1 KV head, untied output), ``roberta`` a
    1-layer RoBERTa masked LM (hidden 32, 2 heads, 66 position rows: 64 positions after the padding index)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForMaskedLM

    tok = checkpoint_tokenizer(texts, style)
    torch.manual_seed(seed)
    sizes = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64)
    if style == "llama":
        model = LlamaForCausalLM(LlamaConfig(**sizes, num_key_value_heads=1, max_position_embeddings=64,
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    else:
        model = RobertaForMaskedLM(RobertaConfig(**sizes, max_position_embeddings=66, type_vocab_size=1,
                                                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                                 eos_token_id=tok.eos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ray_4cpus():
    """One local Ray instance per test module (logical CPUs oversubscribe the 2 cores on purpose). Its
    processes inherit the environment set above (no runtime_env: workers then start without a setup
    process)."""
    import ray

    from ray_lifelong.data.stream import quiet_ray_data

    # no dashboard, but a dashboard port of its own: Ray Train's placement-group cleaner asks the state API
    # at this address whether the run's controller lives, and must not reach another cluster's dashboard on
    # the default port (which answers "no such actor": the cleaner then removes a live run's workers)
    ray.init(num_cpus=4, include_dashboard=False, dashboard_port=free_ports(1)[0], configure_logging=False)
    quiet_ray_data()
    yield
    ray.shutdown()


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def moto_fs(endpoint: str):
    """A pyarrow S3 filesystem on the moto server at ``endpoint`` (``host:port``), with its credentials."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", access_key="test",
                             secret_key="test", allow_bucket_creation=True)


@contextlib.contextmanager
def moto_server():
    """An S3-compatible server (moto) on 127.0.0.1 with test credentials in the environment (which Ray
    processes started afterwards inherit); yields its ``host:port``."""
    pytest.importorskip("moto")  # an extra of [test]; always installed by .ci/run
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # ready once it answers HTTP (a refused connection returns at once, so wait on a deadline, not a count)
    deadline = time.monotonic() + 90
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP(S)_PROXY
    while True:
        if proc.poll() is not None:
            pytest.fail(f"moto server on port {port} exited with {proc.returncode} before it answered")
        try:
            direct.open(f"http://127.0.0.1:{port}/", timeout=2).close()
            break
        except urllib.error.HTTPError:  # an S3 error reply is an answer
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server on port {port} did not answer within 90 s")
            time.sleep(0.2)
    mp = pytest.MonkeyPatch()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        mp.setenv(k, v)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        mp.undo()
        proc.terminate()
        proc.wait(timeout=10)
