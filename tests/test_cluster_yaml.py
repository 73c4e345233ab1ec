"""cluster.yaml is a launchable Ray cluster config: Ray's own schema and checks, EC2's RunInstances
parameters, and the facemill-specific choices (GPU workers, spot, setup). Nothing here talks to AWS."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    if not path.is_file():
        pytest.skip(f"this Ray has no {path}")
    return json.loads(path.read_text())


def test_matches_rays_json_schema(config):
    import jsonschema

    jsonschema.validate(config, _ray_schema())


def test_passes_ray_up_config_checks(config):
    """What `ray up` does before it talks to the cloud: fill defaults, then validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["cluster_name"] == "facemill"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    # setup_commands run on every node (merged ahead of the head/worker specific ones).
    head_cmds = prepared["head_setup_commands"]
    assert any("pip install -e /home/ubuntu/facemill" in c for c in head_cmds)
    assert any("pip install -e /home/ubuntu/facemill" in c for c in prepared["worker_setup_commands"])


def test_required_fields_and_node_types(config):
    for key in ("cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "provider", "auth",
                "available_node_types", "head_node_type", "file_mounts", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    assert config["idle_timeout_minutes"] > 0 and config["upscaling_speed"] > 0
    provider = config["provider"]
    assert provider["type"] == "aws" and provider["region"] and provider["availability_zone"]
    assert provider["cache_stopped_nodes"] is False
    assert config["auth"]["ssh_user"] == "ubuntu"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    for name, node in types.items():
        assert {"resources", "node_config"} <= set(node), name
        assert node["node_config"].get("InstanceType"), name
        assert node["node_config"].get("ImageId", "").startswith("ami-"), name
        assert node["node_config"].get("IamInstanceProfile"), f"{name}: nodes need an S3 role"
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    for name, node in workers.items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers", config["max_workers"])
        assert 0 <= lo <= hi <= config["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]
    assert config["max_workers"] <= sum(t.get("max_workers", config["max_workers"]) for t in workers.values())


def test_gpu_workers_on_demand_and_spot(config):
    types = config["available_node_types"]
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no node type offers a GPU"
    spot = {n for n, t in gpu.items()
            if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    assert spot, "no spot GPU type"
    assert set(gpu) - spot, "no on-demand GPU type"
    for name, node in gpu.items():
        assert node["node_config"]["InstanceType"].startswith(("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4", "p5")), name
        assert node["resources"]["CPU"] >= 1, name
        assert node.get("min_workers", 0) == 0, f"{name}: GPU nodes should scale to zero"


def test_node_configs_are_valid_run_instances_parameters(config):
    """Ray passes node_config to EC2 RunInstances: check it against botocore's model (typos, types)."""
    session = pytest.importorskip("botocore.session").get_session()
    from botocore.validate import ParamValidator

    shape = session.get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node in config["available_node_types"].items():
        params = {**node["node_config"], "MinCount": 1, "MaxCount": 1}
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_setup_and_start_commands(config):
    setup = " ; ".join(config["setup_commands"])
    assert "pip install -e /home/ubuntu/facemill" in setup
    assert config["file_mounts"] == {"/home/ubuntu/facemill": "."}
    head = " ; ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    worker = " ; ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert config["head_start_ray_commands"][0] == config["worker_start_ray_commands"][0] == "ray stop"


def test_pinned_ray_matches_the_installed_one():
    """Laptop and cluster must run one Ray version; the cluster installs pyproject's pin."""
    import ray

    text = (REPO / "pyproject.toml").read_text()
    assert f"ray[default,data,train]=={ray.__version__}" in text, os.linesep.join(
        line for line in text.splitlines() if "ray[" in line)
