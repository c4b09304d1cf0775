"""jobs.label's options that only mean something on GPU actors, and the sample's vocabulary."""

from __future__ import annotations

import logging

import pytest

from jobs import _cli
from jobs.label import (
    _cpus_per_actor,
    _free_cpus_of_one_machine,
    _vocabulary,
    build_parser,
    config_from_args,
)
from jobs.samples import SAMPLE_BACKGROUND, SAMPLE_CLASSES
from tests.conftest import leave_local_ray

BASE = ["in/", "--output", "out", "--classes", "person,cat"]


def _config(*flags: str):
    return config_from_args(build_parser().parse_args([*BASE, *flags]), {})


def test_the_default_precision_is_bf16_in_the_hash_and_quiet_on_cpu_actors(caplog):
    with caplog.at_level(logging.WARNING, logger="jobs.label"):
        default = _config("--gpus-per-actor", "0")
    assert caplog.text == ""
    assert default.segmentor.precision == "bf16"
    # The same run as asking for bf16: the output prefix does not depend on how it was asked.
    assert default.config_hash() == _config("--gpus-per-actor", "0", "--precision", "bf16").config_hash()


def test_resize_defaults_to_torchs_kernel_and_pillow_finds_the_older_runs():
    default = _config("--gpus-per-actor", "0")
    pillow = _config("--gpus-per-actor", "0", "--resize", "pillow")
    assert (default.segmentor.resize, pillow.segmentor.resize) == ("torch", "pillow")
    assert "resize" not in pillow.hashed_fields()["segmentor"]  # hashed as before the option
    assert default.config_hash() != pillow.config_hash()
    with pytest.raises(SystemExit):
        _config("--resize", "cv2")


@pytest.mark.parametrize(
    "flags, warning",
    [
        (["--precision", "bf16"], "--precision bf16 needs GPU actors"),
        (["--precision", "fp16"], "--precision fp16 needs GPU actors"),
        (["--gpu-decode"], "--gpu-decode with actors that have no GPU"),
    ],
)
def test_gpu_only_options_on_cpu_actors_are_announced_once(caplog, flags, warning):
    with caplog.at_level(logging.WARNING, logger="jobs.label"):
        _config("--gpus-per-actor", "1", *flags)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="jobs.label"):
        _config("--gpus-per-actor", "0", *flags)
    assert caplog.text.count(warning) == 1


def test_background_words_add_to_the_samples_vocabulary():
    args = build_parser().parse_args(["--sample", "--background", "road,car park"])
    vocabulary = _vocabulary(args, {})
    assert vocabulary.classes == SAMPLE_CLASSES
    assert vocabulary.background == (*SAMPLE_BACKGROUND, "road", "car park")
    plain = _vocabulary(build_parser().parse_args(["--sample"]), {})
    assert plain.background == SAMPLE_BACKGROUND


def test_background_words_alone_still_need_classes():
    args = build_parser().parse_args(["in/", "--output", "out", "--background", "sky"])
    with pytest.raises(_cli.CliError, match="--background needs classes"):
        _vocabulary(args, {})


def test_the_samples_one_cpu_actor_takes_the_free_cpus_of_a_one_machine_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --sample writes its photos under ./outputs/sample
    sample = build_parser().parse_args(["--sample", "--gpus-per-actor", "0"])
    assert config_from_args(sample, {}, free_cpus=2.0).num_cpus_per_actor == 2.0
    assert config_from_args(sample, {}, free_cpus=3.5).num_cpus_per_actor == 3.0  # whole CPUs
    assert config_from_args(sample, {}).num_cpus_per_actor == 1.0  # a cluster
    assert (tmp_path / "outputs" / "sample" / "images" / "chelsea.jpg").is_file()


@pytest.mark.parametrize(
    "flags, gpus, free_cpus, expected",
    [
        (["in/", "-o", "out", "--classes", "cat"], 0, 16.0, 1.0),  # a corpus: many actors
        (["--sample"], 1, 16.0, 1.0),  # a GPU actor: the CPUs do not decide its speed
        (["--sample", "--cpus-per-actor", "0.5"], 0, 16.0, 0.5),  # asked for
        (["--sample"], 0, 0.5, 1.0),  # at least one
    ],
)
def test_cpus_per_actor_is_one_unless_the_sample_runs_alone(flags, gpus, free_cpus, expected):
    assert _cpus_per_actor(build_parser().parse_args(flags), gpus, free_cpus) == expected


def test_free_cpus_are_read_on_a_one_node_ray_and_not_on_a_cluster():
    import ray
    from ray.cluster_utils import Cluster

    leave_local_ray()  # the driver joins the cluster instead
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert _free_cpus_of_one_machine() == 2.0
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        assert _free_cpus_of_one_machine() is None
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_classes_follow_csv_quoting_and_an_unbalanced_quote_is_refused():
    args = build_parser().parse_args([*BASE[:3], "--classes", 'a, "red, car;crimson car",b'])
    vocabulary = _vocabulary(args, {})
    assert vocabulary.classes == ("a", "red, car", "b")
    assert vocabulary.synonyms == ((), ("crimson car",), ())
    bad = build_parser().parse_args([*BASE[:3], "--classes", 'a,"red'])
    with pytest.raises(_cli.CliError, match="--classes: cannot split"):
        _vocabulary(bad, {})
