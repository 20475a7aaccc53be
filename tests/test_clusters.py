"""clusters/: the autoscaler YAMLs validate against the schema inside the installed ray package, and all
three cluster files agree with what the launcher expects."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTERS = Path(__file__).resolve().parent.parent / "clusters"
LAUNCHER_YAMLS = ["aws-8xh100.yaml", "gcp-a3.yaml"]


def ray_schema() -> dict:
    import ray

    path = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_autoscaler_yaml_matches_ray_schema(name):
    config = yaml.safe_load((CLUSTERS / name).read_text())
    jsonschema.validate(config, ray_schema())


def test_schema_catches_a_bad_config():
    """Negative control: the schema is strict enough to notice a typo."""
    config = yaml.safe_load((CLUSTERS / "aws-8xh100.yaml").read_text())
    config["available_node_types"]["gpu_8xh100"]["min_wokers"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


@pytest.mark.parametrize("name, provider", [("aws-8xh100.yaml", "aws"), ("gcp-a3.yaml", "gcp")])
def test_autoscaler_yaml_fits_the_launcher(name, provider):
    config = yaml.safe_load((CLUSTERS / name).read_text())
    assert config["provider"]["type"] == provider
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # the preflight must never place a GPU worker on the head
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] == 8 for t in workers)
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in start
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_kuberay_manifest():
    manifest = yaml.safe_load((CLUSTERS / "kuberay-raycluster.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    spec = manifest["spec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert {"name": "NCCL_NVLS_ENABLE", "value": "0"} in container["env"]


def test_readme_documents_the_workflow():
    text = (CLUSTERS / "README.md").read_text()
    for needle in ("ray up", "ray job submit --working-dir . -- python -m launcher", "ray job logs",
                   "ray status", "TorchTrainer", "launcher.mode=plan"):
        assert needle in text, needle
