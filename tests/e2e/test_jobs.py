"""`ray job submit` against a real head node (`ray start --head` on 127.0.0.1) with token authentication:
the demo runs as a job, its driver joins that cluster (no second one), and only that head is stopped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_ports, one_domain, tiny_overrides

pytestmark = [pytest.mark.e2e]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head():
    """A head node of our own: its own temp dir and ports, stopped by killing its process group (a bare
    `ray stop` would end every Ray instance on the machine)."""
    token = secrets.token_hex(32)
    # a short temp dir: Ray's unix socket paths must stay under ~100 characters
    temp = tempfile.mkdtemp(prefix="rlj", dir="/tmp")
    # every port of our own: another Ray instance on the machine (a benchmark, say) holds the defaults
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    gcs, dash, *ports = free_ports(2 + len(flags))
    own = [f"--{flag}={port}" for flag, port in zip(flags, ports)]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            *own,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    client_env = {**env, "RAY_ADDRESS": address}
    deadline = time.time() + 180
    while time.time() < deadline:  # the Jobs API answers once the dashboard is up
        ok = subprocess.run(
            [RAY, "job", "list", "--address", address], env=client_env, capture_output=True, text=True
        )
        if ok.returncode == 0:
            break
        assert proc.poll() is None, "ray start --head exited"
        time.sleep(2)
    else:
        pytest.fail(f"the head's Jobs API never answered: {ok.stderr[-2000:]}")
    yield {"address": address, "env": client_env, "token": token, "gcs_port": gcs}
    os.killpg(proc.pid, signal.SIGTERM)
    try:  # a head drains for up to 30 s after SIGTERM; this one's work is done and its temp dir is its own
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # the whole group: raylet, GCS and the workers it started
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def job(head, *args, env=None, timeout=600):
    # --address right after the sub-command: whatever follows `--` is the job's entry point
    return subprocess.run(
        [RAY, "job", args[0], "--address", head["address"], *args[1:]],
        env=env or head["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_a_client_without_the_clusters_token_is_refused(head):
    wrong = job(head, "list", env={**head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(32)}, timeout=120)
    assert wrong.returncode != 0
    assert "auth" in (wrong.stdout + wrong.stderr).lower()


@pytest.mark.timeout(1200)
def test_the_demo_runs_as_a_job_and_joins_the_head(head, demo_corpus, tmp_path):
    out = tmp_path / "jobs"
    overrides = tiny_overrides(demo_corpus, out, arch="gpt2", steps=6) + [
        "run_name=job",
        "scaling.num_workers=1",
        # one domain: the job's entry point and its cluster are the point here, not the chain of stages
        one_domain(demo_corpus),
    ]
    sub_id = f"ray-lifelong-test-{secrets.token_hex(4)}"
    for _ in range(20):  # the head's job agent starts a little after its Jobs API answers
        submitted = job(
            head,
            "submit",
            "--no-wait",
            "--submission-id",
            sub_id,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}),
            "--",
            sys.executable,
            "-m",
            "ray_lifelong",
            "run",
            "configs/demo.yaml",
            *overrides,
            timeout=300,
        )
        # a busy machine: the head's job agent not up yet, or its dashboard dropping the request; a retry of a
        # submission that did reach the head is told its id exists
        if submitted.returncode == 0 or "already exists" in submitted.stderr or not any(
                m in submitted.stderr for m in ("No available agent", "ConnectionError")):
            break
        time.sleep(3)
    assert submitted.returncode == 0 or "already exists" in submitted.stderr, submitted.stderr[-3000:]
    deadline = time.time() + 1000
    while time.time() < deadline:
        st = job(head, "status", sub_id, timeout=120)
        # "Job 'x' succeeded" once it ended, "Status for job 'x': RUNNING" before; a CLI that could not
        # reach the dashboard (busy 2-core machine) exits non-zero: ask again
        status = (st.stdout + st.stderr).lower()
        if st.returncode == 0 and re.search(r"job '[^']*' (succeeded|failed|was stopped)", status):
            break
        time.sleep(5)
    lg = job(head, "logs", sub_id, timeout=120)
    logs = lg.stdout + lg.stderr
    assert "succeeded" in status, status[-2000:] + logs[-4000:]
    # the entry point joined the head (RAY_ADDRESS from the job supervisor) instead of starting a cluster
    # (the GCS advertises the node's own IP, whatever address the head was started on)
    assert re.search(rf"joined the running cluster at [\w.-]+:{head['gcs_port']} ", logs), logs[-3000:]
    assert "started a local cluster" not in logs
    res = json.loads((out / "job" / "results.json").read_text())
    assert len(res["ppl_matrix"]) == 1 and res["stages"][-1]["steps"] == 6
