"""SAM 3 checkpoints: Meta's layout and safetensors load strictly and reproduce the model they
were saved from; checkpoints that do not fit, and the gated hub offline, are clear errors."""

from __future__ import annotations

import hashlib
import time

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cliptrase.errors import CheckpointError, WeightsUnavailableError
from cliptrase.sam3 import build_image_model, load_sam3_segmentor
from cliptrase.sam3.model import SIZES
from cliptrase.sam3.weights import is_hub_id, load_weights

from .conftest import BACKGROUND, CLASSES


@pytest.fixture(scope="module")
def reference(tiny, photos):
    vocab = tiny.vocabulary(CLASSES, BACKGROUND)
    return [r.labels for r in tiny.segment_batch(photos[:2], vocab)], [
        r.confidence_map for r in tiny.segment_batch(photos[:2], vocab)
    ]


def _meta_layout(state: dict) -> dict:
    """As Meta's sam3.pt: everything under "model", the image model under "detector.", the
    video tracker under "tracker.", and the SAM 2 interactive neck the image model lacks."""
    model = {f"detector.{k}": v for k, v in state.items()}
    model["tracker.maskmem_backbone.weight"] = torch.zeros(2)
    model["detector.backbone.vision_backbone.sam2_convs.0.conv_1x1.weight"] = torch.zeros(3)
    return {"model": model}


def _same_outputs(seg, reference, photos):
    vocab = seg.vocabulary(CLASSES, BACKGROUND)
    results = seg.segment_batch(photos[:2], vocab)
    labels, confidence = reference
    for result, a, b in zip(results, labels, confidence):
        assert np.array_equal(result.labels, a) and np.array_equal(result.confidence_map, b)
    assert not seg.random_weights and not results[0].random_weights


def test_meta_checkpoint_loads_and_reproduces_the_saved_model(tiny, reference, photos, tmp_path):
    path = tmp_path / "sam3.pt"
    torch.save(_meta_layout(tiny.model.state_dict()), path)
    seg = load_sam3_segmentor("sam3-tiny", str(path), device="cpu", seed=7)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert seg.identity.weights == f"sha256:{digest}" and not seg.identity.random_weights
    for (name, a), (_, b) in zip(seg.model.state_dict().items(), tiny.model.state_dict().items()):
        assert torch.equal(a, b), name
    _same_outputs(seg, reference, photos)


def test_safetensors_of_a_plain_state_dict_load_too(tiny, reference, photos, tmp_path):
    path = tmp_path / "sam3.safetensors"
    save_file({k: v.contiguous().clone() for k, v in tiny.model.state_dict().items()}, path)
    seg = load_sam3_segmentor("sam3-tiny", str(path), device="cpu", seed=7)
    _same_outputs(seg, reference, photos)


def test_fsspec_uris_load_with_the_bytes_identity(tiny, tmp_path):
    path = tmp_path / "sam3.pt"
    torch.save(_meta_layout(tiny.model.state_dict()), path)
    with fsspec.open("memory://weights/sam3.pt", "wb") as f:
        f.write(path.read_bytes())
    model = build_image_model(SIZES["tiny"], seed=3)
    weights = load_weights(model, "memory://weights/sam3.pt")
    assert weights.identity == f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert torch.equal(
        model.state_dict()["transformer.decoder.query_embed.weight"],
        tiny.model.state_dict()["transformer.decoder.query_embed.weight"],
    )


def test_rope_tables_may_be_absent_and_are_then_computed(tiny, tmp_path):
    state = {k: v for k, v in tiny.model.state_dict().items() if not k.endswith("freqs_cis")}
    path = tmp_path / "no_rope.pt"
    torch.save(state, path)
    model = build_image_model(SIZES["tiny"], seed=3)
    load_weights(model, str(path))
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop", "1 missing"),
        ("add", "1 unexpected"),
        ("reshape", "1 of the wrong shape"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_an_error(tiny, tmp_path, change, message):
    state = dict(tiny.model.state_dict())
    key = "transformer.decoder.query_embed.weight"
    if change == "drop":
        del state[key]
    elif change == "add":
        state["transformer.decoder.extra_head.weight"] = torch.zeros(2)
    else:
        state[key] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(_meta_layout(state), path)
    with pytest.raises(CheckpointError, match=message):
        load_weights(build_image_model(SIZES["tiny"]), str(path))


class _Executable:
    """Unpickling this needs code: weights_only refuses it."""


def test_pickles_needing_code_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"model": _Executable()}, path)
    model = build_image_model(SIZES["tiny"])
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(model, str(path))
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(model, str(tmp_path / "absent.pt"))
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(model, "memory://weights/absent.safetensors")


def test_hub_ids_are_told_from_paths_and_uris():
    assert is_hub_id("facebook/sam3")
    assert not is_hub_id("weights/sam3.pt")
    assert not is_hub_id("s3://bucket/sam3.pt")
    assert not is_hub_id("/abs/path/sam3")
    assert not is_hub_id("sam3.safetensors")


def test_the_gated_hub_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_image_model(SIZES["tiny"])
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as caught:
        load_weights(model, "facebook/sam3")
    assert time.monotonic() - start < 2.0
    message = str(caught.value)
    assert "--weights" in message and "--random-weights" in message
    with pytest.raises(WeightsUnavailableError):
        load_sam3_segmentor("sam3-tiny", "facebook/sam3", device="cpu")


def test_an_unreachable_hub_fails_at_once_with_the_clis_message(monkeypatch, tmp_path):
    """A hub that answers nothing (a closed port on loopback): one TCP probe, then the cache
    only; the same line the CLI prints (cliptrase.hub), in seconds, not after retries."""
    import socket
    import time

    from huggingface_hub import constants

    import cliptrase.hub

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()
    monkeypatch.setattr(cliptrase.hub, "HUB_HOST", closed)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test, whatever we set
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as err:
        load_weights(build_image_model(SIZES["tiny"]), "facebook/sam3")
    assert time.monotonic() - started < 5.0
    assert str(err.value) == cliptrase.hub.not_cached_message("facebook/sam3")
