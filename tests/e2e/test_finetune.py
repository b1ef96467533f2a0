"""Downstream fine-tuning through the command line: a tiny GPT-2 pre-trained by ``ray-lifelong run``, whose
``finetune:`` section fine-tunes the final model on a small labelled task (which demo domain a document comes
from), two seeds on Ray Train, as Tune trials; learning beats the majority class, prompts come from the
pre-training config, and ``ray-lifelong finetune`` on the same config keeps the finished jobs."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest

from ray_lifelong.config import load_config, save_config
from tests.conftest import one_domain, tiny_overrides
from tests.e2e.test_pipeline import cli

pytestmark = [pytest.mark.e2e]


def _slice(demo_corpus: Path, out: Path, per_domain: int = 24) -> str:
    """A labelled slice: the first documents of two demo domains, label = the domain."""
    rows = []
    for dom in ("sports", "astronomy"):
        files = sorted((demo_corpus / dom).glob("train-*.jsonl.gz"))
        lines = itertools.chain.from_iterable(gzip.open(f, "rt") for f in files)
        rows += [
            {"text": json.loads(line)["text"], "label": dom} for line in itertools.islice(lines, per_domain)
        ]
    rows.sort(key=lambda r: r["text"])  # mixed labels, deterministic
    path = out / "slice.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.mark.timeout(1200)
def test_a_run_finetunes_its_final_model_beyond_the_majority_class_and_a_rerun_keeps_finished_jobs(
    demo_corpus, tmp_path
):
    # a tiny GPT-2 pre-trained with domain prompts, whose config lists a fine-tuning task: `ray-lifelong run`
    # fine-tunes the run's final model after its last stage
    data = _slice(demo_corpus, tmp_path)
    cfg = load_config(
        None,
        tiny_overrides(demo_corpus, tmp_path, arch="gpt2", steps=8)
        + [
            "run_name=ft",
            "ray.num_cpus=4",
            "continual.prompts=true",
            # pre-trained on one domain (the task's): fine-tuning is the point here, not the chain of stages
            one_domain(demo_corpus),
            # valid = test = the training slice: the metric then measures learning on the data it saw
            f"finetune.tasks=[{{name: which, domain: sports, train: ['{data}'], valid: ['{data}'], "
            f"test: ['{data}']}}]",
            "finetune.seeds=[0, 1]",
            "finetune.epochs=4",
            "finetune.batch_size=8",
            "finetune.micro_batch_size=4",
            "finetune.lr=3.0e-3",
            "finetune.max_length=48",
            "finetune.max_concurrent=2",
        ],
    )
    config = tmp_path / "ft.yaml"
    save_config(cfg, config)
    done = cli("run", str(config), timeout=1000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the model is the run's export, and prompts come from the run's own config
    assert f"[finetune] {tmp_path / 'ft' / 'final_model'} (gpt2), prompts on" in done.stdout, done.stdout[
        -3000:
    ]

    out = tmp_path / "ft" / "downstream"
    summary = json.loads((out / "downstream.json").read_text())
    task = summary["tasks"]["which"]
    assert task["labels"] == ["astronomy", "sports"] and task["examples"]["train"] == 48
    assert task["majority_test"] == pytest.approx(0.5)
    assert set(task["seeds"]) == {"0", "1"}
    assert task["test"] > task["majority_test"] + 0.2, task  # it learned the slice
    assert summary["average"] == pytest.approx(task["test"]) and summary["prompts"] is True
    assert "| which | accuracy |" in (out / "downstream.md").read_text()
    records = {p: p.stat().st_mtime_ns for p in (out / "which").glob("seed*.json")}
    assert len(records) == 2

    # `ray-lifelong finetune` on the same config (default model: the run's final_model) keeps both jobs
    again = cli("finetune", str(config), timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # nothing left to train: no Ray cluster started for it
    assert "[finetune] all 2 jobs finished before: kept" in again.stdout and "[ray]" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in records} == records  # finished jobs are not trained again
    assert json.loads((out / "downstream.json").read_text()) == summary
