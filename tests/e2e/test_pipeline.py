"""The whole lifelong pipeline through the real command line, on two tiny demo domains."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, one_domain, tiny_overrides

pytestmark = [pytest.mark.e2e]


def cli(*args, timeout=600):
    """Run the CLI in its own process group, so a timeout also ends the Ray processes it started."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ray_lifelong", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # a timeout here or pytest-timeout's: leave no Ray cluster behind for later tests
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_cli_when(ready, *args, timeout=900, poll_s=0.5) -> None:
    """Start the CLI with ``args`` and SIGKILL it, with every Ray process it started, as soon as ``ready()``
    holds: a driver dying mid-run. Fails if the command ends first or ``ready`` never holds."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ray_lifelong", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(poll_s)
        alive = proc.poll() is None
    finally:
        _kill_group(proc)
    assert alive, "the command ended before it could be interrupted"


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (the CLI and every Ray process it started) and reap it."""
    with contextlib.suppress(ProcessLookupError):  # the whole group may have ended already
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.stdout:
        proc.communicate()
    else:
        proc.wait()


@pytest.fixture(scope="module")
def finished_run(demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    overrides = tiny_overrides(demo_corpus, out, arch="gpt2", steps=8) + ["run_name=e2e", "ray.num_cpus=4",
                                                                          "data.pretokenize=true"]
    # the domains packed once ahead of the run (ray-lifelong pack), which then reads them as they are
    packed = cli("pack", str(REPO / "configs/demo.yaml"), *overrides)
    assert packed.returncode == 0, packed.stdout[-3000:] + packed.stderr[-3000:]
    assert "sports: " in packed.stdout and "astronomy: " in packed.stdout
    proc = cli("run", str(REPO / "configs/demo.yaml"), *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[data] packing" not in proc.stdout
    return out / "e2e", overrides, proc


def test_results_json_has_full_matrix_and_metrics(finished_run):
    run, _, proc = finished_run
    res = json.loads((run / "results.json").read_text())
    assert res["domains"] == ["sports", "astronomy"]
    assert len(res["ppl_matrix"]) == 2 and all(len(r) == 2 for r in res["ppl_matrix"])
    assert all(1 < p < 1e6 for row in res["ppl_matrix"] for p in row)
    m = res["ppl_matrix"]
    assert m[0][0] < m[0][1] and m[1][1] < m[0][1]  # learning the new domain helps it
    assert len(res["AP"]) == len(res["AP_arithmetic"]) == 2 and res["AP_plus"][0] is None
    assert res["AP_plus"][1] == pytest.approx(m[1][0] - m[0][0])
    for s in res["stages"]:
        assert s["steps"] == 8 and s["tokens"] == 8 * 8 * 32 and s["train_flops"] > 0 and s["wall_time_s"] > 0
    assert res["stages"][1]["cumulative_flops"] == pytest.approx(2 * res["stages"][0]["train_flops"])
    assert "step 8/8" in proc.stdout + proc.stderr  # progress lines reach the terminal


def test_the_console_holds_the_projects_lines_and_nothing_of_rays_internals(finished_run):
    """Every line a run prints is the project's own (or the command's closing AP line)."""
    from ray_lifelong.console import OWN

    _, _, proc = finished_run
    text = proc.stdout + proc.stderr
    lines = [ln for ln in text.splitlines() if ln.strip()]
    foreign = [ln for ln in lines if not OWN.match(ln) and not ln.startswith("AP (geometric)")]
    if "Found multiple active Ray instances" in text:
        # a real error of Ray Train's placement-group cleaner, which looks its cluster up by address and
        # fails when another Ray cluster runs on the same machine (a test run beside this one): not noise
        foreign = [ln for ln in foreign if "PlacementGroupCleaner" not in ln]
    assert not foreign, "\n".join(foreign[:10])
    assert any("ETA stage" in ln for ln in lines) and any("stage 2 of 2" in ln for ln in lines)


def test_tensorboard_curves_and_status_of_the_finished_run(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = finished_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12, 14, 16]  # log_every=2
    assert [e.step for e in acc.Scalars("stage/ppl/sports")] == [8, 16]
    proc = cli("status", str(run))
    assert proc.returncode == 0 and "done, final AP" in proc.stdout and "[done] 01-astronomy" in proc.stdout


def test_run_directory_layout(finished_run):
    run, _, _ = finished_run
    for name in ("config.yaml", "report.md", "ppl_matrix_and_loss.png", "tokenizer/tokenizer.json",
                 "stages/00-sports/stage.json", "stages/01-astronomy/stage.json"):
        assert (run / name).exists(), name
    assert sorted(p.name[:5] for p in (run / "packed").iterdir()) == ["00-sp", "01-as"]
    assert "Perplexity matrix" in (run / "report.md").read_text()
    from ray_lifelong.config import load_config

    assert load_config(run / "config.yaml").run_name == "e2e"  # the saved config is loadable as is


def test_final_model_loads_with_transformers(finished_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _, _ = finished_run
    model = AutoModelForCausalLM.from_pretrained(run / "final_model", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(run / "final_model", local_files_only=True)
    ids = torch.tensor([tok("the star orbited a distant galaxy")["input_ids"]])
    # the vocabulary rows are the tokenizer's, rounded up to model.vocab_multiple (64)
    assert model(input_ids=ids).logits.shape[-1] == -(-len(tok) // 64) * 64 >= len(tok)
    assert tok.convert_tokens_to_ids("<dom:sports>") != tok.unk_token_id


def test_rerun_refuses_and_resume_skips_finished_stages(finished_run):
    run, overrides, _ = finished_run
    before = (run / "results.json").read_text()
    proc = cli("run", str(REPO / "configs/demo.yaml"), *overrides)
    # before Ray starts
    assert proc.returncode == 2 and "--resume" in proc.stderr and "[ray]" not in proc.stdout
    proc = cli("run", str(REPO / "configs/demo.yaml"), *overrides, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("already finished: skipped") == 2
    assert "[ray]" not in proc.stdout  # nothing left to train: the results are rewritten without Ray
    assert json.loads((run / "results.json").read_text())["ppl_matrix"] == json.loads(before)["ppl_matrix"]


def test_cli_reports_config_and_data_errors(tmp_path):
    proc = cli("run", str(REPO / "configs/demo.yaml"), "train.stpes=3")
    assert proc.returncode == 2 and "train.stpes" in proc.stderr
    proc = cli(
        "tokenizer",
        str(REPO / "configs/demo.yaml"),
        "demo.enabled=false",
        f"data.domains=[{{name: x, train: ['{tmp_path}/none/*.jsonl']}}]",
        "--out",
        str(tmp_path / "t"),
    )
    assert proc.returncode == 2 and "domain 'x' train: no file matches" in proc.stderr
    proc = cli("pack", str(REPO / "configs/demo.yaml"))  # a config whose runs would not read packed domains
    assert proc.returncode == 2 and "data.pretokenize" in proc.stderr


@pytest.mark.timeout(1500)
def test_ki_command_runs_teacher_student_and_baseline(demo_corpus, tmp_path):
    out = tmp_path / "ki"
    overrides = tiny_overrides(demo_corpus, out, arch="bert", steps=6) + [
        "run_name=kt",
        "ray.num_cpus=4",
        "train.eval_every=2",
        "ki.teacher_steps=4",
        "scaling.num_workers=1",
        "ki.teacher_model.num_layers=1",
        "ki.teacher_model.hidden_size=16",
        "ki.teacher_model.num_heads=2",
        "ki.teacher_model.intermediate_size=32",
        "ki.inherit.steps=3",
        one_domain(demo_corpus),
    ]
    proc = cli("ki", str(REPO / "configs/ki_bert.yaml"), *overrides, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "kt" / "ki_results.json").read_text())
    assert set(res["curves"]) == {"ki", "baseline", "teacher"}
    assert [p["step"] for p in res["curves"]["ki"]] == [2, 4, 6]
    ki_flops, base_flops = res["curves"]["ki"][-1]["flops"], res["curves"]["baseline"][-1]["flops"]
    assert ki_flops > base_flops  # the teacher's forward passes are charged to KI
    assert "saved_step_matched" in res and (out / "kt" / "ki_report.md").exists()
    teacher = json.loads((out / "kt" / "kt-teacher" / "results.json").read_text())
    assert teacher["stages"][0]["model_sizes"]["hidden_size"] == 16
