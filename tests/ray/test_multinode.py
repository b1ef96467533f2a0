"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``): a head and two worker nodes that carry a
``trainer`` resource. Stages place one training worker on each worker node (STRICT_SPREAD), the model
grows between stages, a stage survives the loss of one of its nodes once a replacement joins, and a stage
whose workers can never be placed fails with a message that says so."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from ray_lifelong.config import load_config
from ray_lifelong.pipeline import run_lifelong
from tests.conftest import elle_overrides, free_ports, one_domain, tiny_overrides

pytestmark = [pytest.mark.ray]

SPREAD = [
    "scaling.num_workers=2",
    "scaling.placement_strategy=STRICT_SPREAD",
    "scaling.resources={trainer: 1}",
    "scaling.cpus_per_worker=0.25",
    "ray.max_failures=1",
]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from ray_lifelong.data.stream import quiet_ray_data

    # the Train controller reads this; the cluster's processes inherit it (a short wait for the failure test)
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                        "dashboard_port": free_ports(1)[0]})  # as ray_4cpus
    workers = [c.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(
        address=c.address,
        configure_logging=False,
        runtime_env={
            "env_vars": {
                k: os.environ[k]
                for k in (
                    "HF_HUB_OFFLINE",
                    "TOKENIZERS_PARALLELISM",
                    "RAY_DATA_LOG_LEVEL",
                    "RAY_TRAIN_ENABLE_PRINT_PATCH",
                )
            }
        },
    )
    quiet_ray_data()
    yield c, workers
    ray.shutdown()
    c.shutdown()
    mp.undo()


def test_two_stages_with_growth_place_one_worker_on_each_node(cluster, demo_corpus, tmp_path):
    c, workers = cluster
    cfg = load_config(None, elle_overrides(demo_corpus, tmp_path, *SPREAD))
    res = run_lifelong(cfg)
    assert len(res["stages"]) == 2
    wanted = {w.node_id for w in workers}
    for stage in res["stages"]:
        assert set(stage["nodes"]) == wanted, (stage["domain"], stage["nodes"], wanted)  # one per worker node
    assert set(res["stages"][1]["frw"]["nodes"]) == wanted
    grown = res["stages"][1]
    assert grown["growth"]["after"]["hidden_size"] == 64 and grown["model_sizes"]["num_hidden_layers"] == 2
    assert grown["steps"] == 8 and grown["replayed_sequences"] > 0
    assert all(x == x and x > 1 for row in res["ppl_matrix"] for x in row)  # finite perplexities


def test_a_stage_resumes_on_a_replacement_node_when_one_of_its_nodes_is_removed(
    cluster, demo_corpus, tmp_path
):
    c, workers = cluster
    # a wide kill window (22 slowed steps after the first checkpoint): on a loaded machine a narrower one let
    # the stage finish before the node's death was noticed
    overrides = (
        tiny_overrides(demo_corpus, tmp_path, steps=24)
        + SPREAD
        + ["run_name=lost", "train.checkpoint_every=2", "debug.slow_step_s=1.0", one_domain(demo_corpus)]
    )
    cfg = load_config(None, overrides)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(res=run_lifelong(cfg)), daemon=True)
    runner.start()
    ckpt_root = tmp_path / "lost" / "checkpoints" / "lost-stage0-sports"
    deadline = time.time() + 300
    # two checkpoints on disk: the first one is registered by then (Ray Train registers a checkpoint after the
    # workers' report returns; a node removed as soon as the first directory appears could restart from step
    # 0)
    while time.time() < deadline and runner.is_alive() and len(list(ckpt_root.glob("checkpoint_*"))) < 2:
        time.sleep(0.25)
    assert runner.is_alive(), f"the stage ended before a node could be removed: {outcome}"
    lost = workers.pop(0)
    c.remove_node(lost)  # kills that node's raylet and the training worker on it
    # the two workers need two nodes with a trainer slot: the stage waits until an autoscaler-like
    # replacement joins, then restarts its worker group from the last checkpoint
    workers.append(c.add_node(num_cpus=1, resources={"trainer": 1}))
    runner.join(timeout=600)
    assert not runner.is_alive() and "res" in outcome, "the stage did not finish after the node was replaced"
    stage = outcome["res"]["stages"][0]
    assert stage["restarts"] == 1 and stage["steps"] == 24
    steps = [h["step"] for h in stage["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 24, steps
    assert lost.node_id not in stage["nodes"] and set(stage["nodes"]) == {w.node_id for w in workers}
    record = json.loads((Path(tmp_path) / "lost" / "results.json").read_text())
    assert record["stages"][0]["restarts"] == 1


def test_a_stage_that_cannot_get_its_nodes_fails_with_a_clear_message(cluster, demo_corpus, tmp_path):
    from ray_lifelong.stage.run import StageFailedError

    cfg = load_config(
        None,
        tiny_overrides(demo_corpus, tmp_path, steps=4)
        + SPREAD
        + ["run_name=short", "scaling.num_workers=4", "train.batch_size=16", "ray.startup_failures=0"],
    )
    t0 = time.time()
    with pytest.raises(
        StageFailedError, match=r"stage 0 \(sports\) failed: .*timed out .* waiting for 4 workers"
    ):
        run_lifelong(cfg)  # 4 workers, one per node with a trainer slot: only 2 such nodes exist
    assert time.time() - t0 < 240
