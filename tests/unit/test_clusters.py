"""Cluster definitions in clusters/: the autoscaler YAMLs against Ray's own schema and config checks, the
KubeRay manifests against the CRD schemas (shared/kuberay-crds), and the overlays against our schema."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from ray_lifelong.config import load_config
from tests.conftest import REPO

CLUSTERS = REPO / "clusters"
CRDS = REPO.parent / "shared" / "kuberay-crds"
AUTOSCALER = ["aws.yaml", "gcp.yaml"]


def ray_validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("name", AUTOSCALER)
def test_autoscaler_yaml_passes_rays_validation(name):
    cfg = yaml.safe_load((CLUSTERS / name).read_text())
    ray_validate(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}  # no training on the head
    gpu = {k: v for k, v in types.items() if k.startswith("gpu")}
    assert gpu and all(
        v["min_workers"] == 0 and 0 < v["max_workers"] <= cfg["max_workers"] for v in gpu.values()
    )
    assert any("pip install" in c and "ray_lifelong" in c for c in cfg["setup_commands"])
    assert "ray_lifelong" in " ".join(cfg["file_mounts"])


@pytest.mark.parametrize("name", AUTOSCALER)
def test_autoscaler_validation_can_fail(name):
    cfg = yaml.safe_load((CLUSTERS / name).read_text())
    bad = {**cfg, "max_worker": 3}  # a typo of a top-level key
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(bad)
    bad = copy.deepcopy(cfg)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        ray_validate(bad)


def test_gpu_instance_types_have_gpus():
    aws = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())["available_node_types"]
    assert {aws[k]["node_config"]["InstanceType"] for k in aws if k.startswith("gpu")} == {
        "p4d.24xlarge",
        "p5.48xlarge",
    }
    gcp = yaml.safe_load((CLUSTERS / "gcp.yaml").read_text())["available_node_types"]
    for k in (k for k in gcp if k.startswith("gpu")):
        nc = gcp[k]["node_config"]
        assert nc["machineType"].startswith(("a2-", "a3-")) and nc["scheduling"] == [
            {"onHostMaintenance": "TERMINATE"}
        ]


@pytest.mark.parametrize("overlay, scheme", [("gpu_s3.yaml", "s3://"), ("gpu_gcs.yaml", "gs://")])
def test_cluster_overlays_load_over_the_corpus_configs(overlay, scheme):
    for base in ("corpus_bert.yaml", "elle_stream_gpt2.yaml"):
        cfg = load_config(REPO / "configs" / base, [str(CLUSTERS / "overlays" / overlay)])
        assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8 and cfg.train.bf16
        assert cfg.ray.storage_path.startswith(scheme) and cfg.continual.replay.memory_path.startswith(scheme)
        assert cfg.data.packed_path.startswith(scheme)


# ---------------------------------------------------------------------------------------------- KubeRay


def crd_schema(kind_file: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent: the KubeRay CRD schemas are needed to validate the manifests")
    crd = yaml.safe_load((CRDS / kind_file).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def unknown_fields(doc, schema, path="") -> list[str]:
    """Fields the CRD does not define. Kubernetes silently prunes them, so a typo (say
    ``enableInTreeAutoscalling``) would be lost without an error: we reject them instead."""
    out = []
    if (
        isinstance(doc, dict)
        and "properties" in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        for key, value in doc.items():
            if key not in schema["properties"]:
                if not schema.get("additionalProperties"):
                    out.append(f"{path}.{key}")
                continue
            out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def check_manifest(doc: dict, schema: dict) -> None:
    jsonschema.validate(doc, schema)
    unknown = unknown_fields(doc, schema)
    if unknown:
        raise jsonschema.ValidationError(f"fields the CRD does not define: {unknown}")


def gpu_groups(spec: dict) -> list[dict]:
    return [
        g
        for g in spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]


def test_raycluster_manifest_matches_the_crd_and_autoscales_gpus_from_zero():
    doc = yaml.safe_load((CLUSTERS / "kuberay/raycluster.yaml").read_text())
    check_manifest(doc, crd_schema("ray.io_rayclusters.yaml"))
    spec = doc["spec"]
    assert doc["apiVersion"] == "ray.io/v1" and spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    groups = gpu_groups(spec)
    assert groups and all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in groups)


def test_rayjob_manifest_matches_the_crd_and_runs_a_lifelong_config():
    doc = yaml.safe_load((CLUSTERS / "kuberay/rayjob.yaml").read_text())
    check_manifest(doc, crd_schema("ray.io_rayjobs.yaml"))
    spec = doc["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "ray_lifelong", "run"]
    config, overlay = REPO / entry[4], REPO / entry[5]
    assert config.is_file() and overlay.is_file()
    load_config(config, [str(overlay)] + [a for a in entry[6:] if "=" in a])  # the job's config is valid
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True and gpu_groups(spec["rayClusterSpec"])
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_manifest_checks_can_fail():
    schema = crd_schema("ray.io_rayclusters.yaml")
    doc = yaml.safe_load((CLUSTERS / "kuberay/raycluster.yaml").read_text())
    typo = copy.deepcopy(doc)
    typo["spec"]["enableInTreeAutoscalling"] = typo["spec"].pop("enableInTreeAutoscaling")
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoscalling"):
        check_manifest(typo, schema)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        check_manifest(wrong, schema)


def test_runtime_env_example_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTERS / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own parsing of the fields
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
