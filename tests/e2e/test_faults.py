"""A driver killed in the middle of an ELLE run whose checkpoints and packed domains live on S3 (moto on
127.0.0.1):
``ray-lifelong run --resume`` continues from the last checkpoint in that store, with the replay memory and
the growth history of the first run, and writes the same results layout."""

from __future__ import annotations

import json

import pytest

from ray_lifelong.config import load_config, save_config
from tests.conftest import elle_overrides, moto_fs, moto_server
from tests.e2e.test_pipeline import cli, kill_cli_when

pytestmark = [pytest.mark.e2e]


def _checkpoint_states(fs, prefix: str) -> list[dict]:
    """The ``state.json`` of every checkpoint under ``prefix`` that has one yet."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    except (FileNotFoundError, OSError):
        return []
    states = []
    for info in infos:
        if info.base_name == "state.json" and "/checkpoint_" in info.path:
            try:
                with fs.open_input_stream(info.path) as f:
                    states.append(json.loads(f.read()))
            except (FileNotFoundError, OSError, ValueError):  # being written or removed right now
                pass
    return states


@pytest.mark.timeout(1500)
def test_a_killed_driver_resumes_an_elle_run_from_its_checkpoints_on_s3(demo_corpus, tmp_path):
    import pyarrow.fs as pafs

    with moto_server() as endpoint:
        fs = moto_fs(endpoint)
        fs.create_dir("ckpts")
        query = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
        cfg = load_config(
            None,
            elle_overrides(demo_corpus, tmp_path)
            + [
                f"ray.storage_path=s3://ckpts/lifelong?{query}",
                "ray.num_cpus=4",
                "scaling.num_workers=1",
                "train.micro_batch_size=8",
                "train.checkpoint_every=2",
                "data.domains.1.steps=16",
                "debug.slow_step_s=0.4",
                "data.pretokenize=true",
                f"data.packed_path=s3://ckpts/packed?{query}",
            ],
        )
        config = tmp_path / "elle.yaml"
        save_config(cfg, config)
        rdir = tmp_path / "elle"
        # kill the driver and the Ray processes it started once the grown stage has a checkpoint on S3 in its
        # domain phase, after its function-recovering warmup (the same Ray Train run); step 4, so that the
        # checkpoints reported before it (the warmup's hand-over at step 0, step 2) are surely registered
        kill_cli_when(
            lambda: any(
                s.get("stage") == 1 and s["phase"] == "main" and s["step"] >= 4
                # both stages train in one Ray Train run, named after its first
                for s in _checkpoint_states(fs, "ckpts/lifelong/elle-stage0-sports")
            ),
            "run",
            str(config),
        )
        assert not (rdir / "results.json").exists()
        memories = sorted((rdir / "memory").rglob("*.parquet"))
        assert memories, "the first domain's memory was not written before the kill"
        mtimes = {p: p.stat().st_mtime_ns for p in memories}

        resumed = cli("run", str(config), "--resume", timeout=1200)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "stage 00-sports already finished: skipped" in resumed.stdout
        # both domains were packed on S3 before the kill, and the resumed run reads them as they are
        assert len(fs.get_file_info(pafs.FileSelector("ckpts/packed"))) == 2
        assert "[data] packing" not in resumed.stdout

    res = json.loads((rdir / "results.json").read_text())
    assert len(res["stages"]) == 2 and len(res["ppl_matrix"]) == 2
    grown = res["stages"][1]
    assert grown["restarts"] == 1  # continued from its checkpoint on S3, not from step 0
    assert grown["steps"] == 16 and grown["tokens"] == 16 * 8 * 32
    steps = [h["step"] for h in grown["history"]]
    assert steps == list(range(2, 17, 2)), steps  # nothing lost or repeated across the kill
    assert grown["checkpoint"].startswith("s3://ckpts/lifelong/elle-stage0-sports/checkpoint_")
    assert grown["checkpoint"].endswith(f"?{query}")
    assert grown["growth"]["after"]["hidden_size"] == 64 and grown["model_sizes"]["num_hidden_layers"] == 2
    # the warmup's record came back with the checkpoint
    assert grown["frw"]["steps"] == 3 and grown["frw"]["restarts"] == 0 and grown["replayed_sequences"] > 0
    assert [h["step"] for h in grown["frw"]["history"]] == [2, 3]
    assert {p: p.stat().st_mtime_ns for p in memories} == mtimes  # the memory was reused, not rewritten
    assert (rdir / "final_model" / "config.json").exists() and (rdir / "report.md").exists()
