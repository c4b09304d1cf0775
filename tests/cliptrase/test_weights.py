"""Checkpoints: every supported layout and location loads into identical weights; bad ones fail clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import s3fs
import torch
from safetensors.torch import save_file

import cliptrase
from cliptrase.errors import CheckpointError, UnsupportedModelError

MODEL = "ViT-Tiny-16-test"


@pytest.fixture(scope="module")
def source_state():
    """Weights from a different seed than the default, so a silent fallback cannot pass."""
    seg = cliptrase.load_segmentor(MODEL, pretrained=None, seed=123, device="cpu")
    return {k: v.clone() for k, v in seg.clip.state_dict().items()}


def openai_layout(state):
    out = dict(state)
    # The OpenAI release carries these metadata entries beside the parameters.
    out.update(
        input_resolution=torch.tensor(224),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    return out


def open_clip_layout(state):
    return {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}


def _write(path, layout, state):
    obj = layout(state)
    if str(path).endswith(".safetensors"):
        flat = obj["state_dict"] if "state_dict" in obj else obj
        save_file({k: v.contiguous() for k, v in flat.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


def _assert_same_weights(seg, state):
    loaded = seg.clip.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key].cpu(), value), key


@pytest.mark.parametrize("layout", [openai_layout, open_clip_layout])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoints_round_trip(tmp_path, source_state, layout, suffix):
    path = _write(tmp_path / f"ckpt{suffix}", layout, source_state)
    seg = cliptrase.load_segmentor(MODEL, pretrained=str(path), device="cpu")
    _assert_same_weights(seg, source_state)
    assert not seg.random_weights
    assert seg.weights.identity.startswith("sha256:") and len(seg.weights.identity) == 7 + 64


@pytest.mark.parametrize("layout", [openai_layout, open_clip_layout])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_s3_checkpoints_round_trip(tmp_path, s3_endpoint, source_state, layout, suffix):
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    bucket = f"weights-{layout.__name__.replace('_', '-')}{suffix.replace('.', '-')}"
    fs.mkdir(bucket)
    local = _write(tmp_path / f"ckpt{suffix}", layout, source_state)
    fs.put(str(local), f"{bucket}/clip/ckpt{suffix}")
    seg = cliptrase.load_segmentor(
        MODEL, pretrained=f"s3://{bucket}/clip/ckpt{suffix}", storage_options=options, device="cpu"
    )
    _assert_same_weights(seg, source_state)
    local_seg = cliptrase.load_segmentor(MODEL, pretrained=str(local), device="cpu")
    assert seg.weights.identity == local_seg.weights.identity


def test_missing_s3_object_is_a_checkpoint_error(s3_endpoint):
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    s3fs.S3FileSystem(**options).mkdir("empty-bucket")
    with pytest.raises(CheckpointError, match="not found"):
        cliptrase.load_segmentor(
            MODEL, pretrained="s3://empty-bucket/nope.safetensors", storage_options=options
        )


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        cliptrase.load_segmentor(MODEL, pretrained=str(tmp_path / "absent.safetensors"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x00not a checkpoint" * 64)
    with pytest.raises(CheckpointError, match="not a readable"):
        cliptrase.load_segmentor(MODEL, pretrained=str(path))


def test_truncated_safetensors(tmp_path, source_state):
    path = _write(tmp_path / "ckpt.safetensors", openai_layout, source_state)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        cliptrase.load_segmentor(MODEL, pretrained=str(path))


def test_wrong_architecture_names_the_mismatch(tmp_path, source_state):
    state = dict(source_state)
    state.pop("visual.proj")
    path = _write(tmp_path / "partial.safetensors", openai_layout, state)
    with pytest.raises(CheckpointError, match="1 missing.*visual.proj"):
        cliptrase.load_segmentor(MODEL, pretrained=str(path))


class Payload:
    """Any non-tensor object makes a pickle that needs code to load."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_with_code_is_refused_unless_trusted(tmp_path, source_state):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": source_state, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        cliptrase.load_segmentor(MODEL, pretrained=str(path))
    # Explicitly trusted, the same file loads (its payload only calls os.getcwd).
    seg = cliptrase.load_segmentor(MODEL, pretrained=str(path), trust_pickle=True)
    _assert_same_weights(seg, source_state)


def test_non_tensor_entries_are_refused(tmp_path, source_state):
    path = tmp_path / "odd.pt"
    torch.save({**source_state, "note": "hello"}, path)
    with pytest.raises(CheckpointError, match="'note' is not a tensor"):
        cliptrase.load_segmentor(MODEL, pretrained=str(path))


def test_unknown_model_and_tag():
    with pytest.raises(UnsupportedModelError, match="unknown open_clip model"):
        cliptrase.load_segmentor("ViT-Nope-99", pretrained=None)
    with pytest.raises(CheckpointError, match="no pretrained tag"):
        cliptrase.load_segmentor("ViT-B-16", pretrained="not-a-tag")


def test_resnet_towers_are_refused():
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        cliptrase.load_segmentor("RN50", pretrained=None)


def test_offline_pretrained_tag_says_how_to_use_a_local_file(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path))
    code = (
        "import cliptrase\n"
        "try:\n"
        "    cliptrase.load_segmentor('ViT-B-32', pretrained='openai')\n"
        "except cliptrase.WeightsUnavailableError as e:\n"
        "    print('UNAVAILABLE', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "UNAVAILABLE" in out.stdout, out.stderr[-2000:]
    assert "--weights" in out.stdout and "pretrained=" in out.stdout


def test_the_library_fails_offline_as_fast_as_the_cli_with_the_clis_message(
    monkeypatch, tmp_path
):
    """A hub that answers nothing (a closed port on loopback), nothing cached: one TCP probe,
    then the cache only; no minute of retries. The CLI prints the same line (jobs._cli runs
    cliptrase.weights and passes its message on)."""
    import socket
    import subprocess
    import sys
    import time

    from huggingface_hub import constants

    import cliptrase
    import cliptrase.hub

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()
    monkeypatch.setattr(cliptrase.hub, "HUB_HOST", closed)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test, whatever is set
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    started = time.monotonic()
    with pytest.raises(cliptrase.WeightsUnavailableError) as err:
        cliptrase.load_segmentor("ViT-B-16", pretrained="openai")
    assert time.monotonic() - started < 10.0
    message = cliptrase.hub.not_cached_message("ViT-B-16/openai")
    assert str(err.value) == message
    cli = subprocess.run(
        [sys.executable, "-m", "cliptrase.weights", "ViT-B-16", "openai"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )  # fmt: skip
    assert cli.returncode == 2 and cli.stderr.strip() == f"error: {message}"
