"""cluster.yaml is a config `ray up` accepts: Ray's own schema validation, offline."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema_validation(config):
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(config))


def test_cluster_yaml_with_rays_aws_defaults_filled_in_still_validates(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # merges aws/defaults.yaml; no AWS calls
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"


def test_gpu_workers_scale_from_zero_and_the_package_is_installed(config):
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 1
    assert worker["resources"] == {"GPU": 1}
    assert "GPU" not in config["available_node_types"]["head"]["resources"]
    assert config["idle_timeout_minutes"] > 0
    assert "ray-ml" not in config["docker"]["image"]  # no longer built upstream
    assert any("pip install" in c and "cliptrase-pipeline" in c for c in config["setup_commands"])
    assert "." in config["file_mounts"].values()


def test_a_broken_config_is_rejected_by_the_same_check(config):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError, match="zero"):
        validate_config(broken)
