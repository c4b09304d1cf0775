"""Where SAM 3 weights come from: a local file, any fsspec URI, or the Hugging Face hub.

The model code never touches disk or network; this module does, once, at load time.
Checkpoints are read without executing code (``torch.load(weights_only=True)`` or
safetensors), in either layout: Meta's (``{"model": {"detector.<key>": ...,
"tracker.<key>": ...}}``, ``sam3/model_builder.py:523-545``) or a plain
``Sam3Image.state_dict()``. Unlike the official loader (``load_state_dict(strict=False)``
and a ``print`` of the missing keys), a checkpoint that does not fit is an error
(:class:`~cliptrase.errors.CheckpointError`), with two documented exceptions:

* ``backbone.vision_backbone.sam2_convs.*``: Meta's checkpoint carries the SAM 2 interactive
  neck (22 tensors), which the image builder only builds with
  ``enable_inst_interactivity=True``; the official image model ignores them too.
* the ViT's RoPE tables (``*.attn.freqs_cis``) are persistent buffers the model computes
  from its sizes: a checkpoint without them keeps the computed ones; one with them loads
  them, as the official loader does.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, WeightsUnavailableError, reading_checkpoint
from ..hub import not_cached_message, offline_if_unreachable

HUB_CHECKPOINT = "sam3.pt"  # model_builder.py:640-646 (download_ckpt_from_hf)
# Checkpoint keys for modules the image model does not build (see the module docstring).
IGNORED_PREFIXES = ("backbone.vision_backbone.sam2_convs.",)
COMPUTED_BUFFER_SUFFIXES = (".attn.freqs_cis",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
_READ_CHUNK = 1 << 24

_ADVICE = (
    "Download sam3.pt elsewhere and pass its local path or URI as pretrained= (CLI: "
    "--weights PATH), or pass pretrained=None (CLI: --random-weights) for a plumbing check "
    "with random weights."
)


@dataclass(frozen=True)
class Sam3Weights:
    """What weights a model carries, for provenance in outputs."""

    identity: str  # "sha256:<hex>", "hf:facebook/sam3", "random-init:seed=N"
    random: bool


def is_hub_id(pretrained: str) -> bool:
    """``owner/name`` of a Hugging Face repository, not a file path or an fsspec URI."""
    if "://" in pretrained or Path(pretrained).suffix in _CHECKPOINT_SUFFIXES:
        return False
    return bool(_HUB_ID.match(pretrained)) and not Path(pretrained).exists()


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, when it is imported.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_checkpoint(repo_id: str) -> str:
    """The local path of ``repo_id``'s ``sam3.pt``: from the hub cache when it is there;
    else, unless ``HF_HUB_OFFLINE`` is set, after one metadata request without retries
    (huggingface_hub would otherwise retry an unreachable hub with backoff for ~25 s), the
    download. Every failure is a :class:`~cliptrase.errors.WeightsUnavailableError`."""
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    except ImportError as exc:  # pragma: no cover - sam3 depends on huggingface_hub
        raise WeightsUnavailableError(f"huggingface_hub is not installed. {_ADVICE}") from exc
    offline_if_unreachable()
    try:
        return hf_hub_download(repo_id, HUB_CHECKPOINT, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - not cached (or an unreadable cache)
        if _hub_offline():
            raise WeightsUnavailableError(not_cached_message(repo_id)) from exc
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, HUB_CHECKPOINT), retry_on_errors=False)
        return hf_hub_download(repo_id, HUB_CHECKPOINT)
    except Exception as exc:  # noqa: BLE001 - network, auth, gating and cache errors alike
        raise _unavailable(repo_id, exc) from exc


def _unavailable(repo_id: str, exc: Exception) -> WeightsUnavailableError:
    gated = type(exc).__name__ in {"GatedRepoError", "RepositoryNotFoundError"}
    hint = (
        f" {repo_id} is gated: accept the SAM License on https://huggingface.co/{repo_id} "
        "and log in (hf auth login, or HF_TOKEN)."
        if gated
        else ""
    )
    return WeightsUnavailableError(
        f"could not fetch SAM 3 weights {repo_id}/{HUB_CHECKPOINT} "
        f"({type(exc).__name__}: {_last_line(str(exc))}).{hint} Offline? {_ADVICE}"
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else text


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    return len(head) == 9 and head[8:9] == b"{"


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A local checkpoint file as a flat dict of tensors (Meta's layout unwrapped)."""
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(path)
        except (SafetensorError, ValueError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    else:
        try:
            try:  # memory-mapped: a 3.4 GB checkpoint is not copied into memory first
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path} needs code execution to load, which is refused (weights_only): "
                f"{_last_line(str(exc))}. Convert it to safetensors."
            ) from exc
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    return image_model_state(obj, path)


def image_model_state(obj: object, name: str) -> dict[str, torch.Tensor]:
    """The ``Sam3Image`` keys of a checkpoint: Meta's ``ckpt["model"]`` with its
    ``detector.`` keys (``model_builder.py:527-531``: keys containing "detector", the prefix
    removed; tracker keys dropped), or a plain ``Sam3Image.state_dict()`` as it is."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{name} holds no state dict")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: entry {key!r} is not a tensor")
    if any("detector" in key for key in obj):
        return {k.replace("detector.", ""): v for k, v in obj.items() if "detector" in k}
    return dict(obj)


def load_state_strictly(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load ``state`` into ``model``; CheckpointError unless every key fits (module
    docstring: the SAM 2 neck's keys are skipped, computed RoPE tables may be absent)."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    missing = sorted(
        k for k in set(expected) - set(state) if not k.endswith(COMPUTED_BUFFER_SUFFIXES)
    )
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(state) if expected[k].shape != state[k].shape
    )
    problems = [
        f"{len(keys)} {label}, e.g. {keys[:3]}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of the wrong shape", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(f"{name} does not fit this SAM 3 image model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)


def load_weights(
    model: nn.Module,
    pretrained: str | None,
    seed: int = 0,
    storage_options: dict | None = None,
) -> Sam3Weights:
    """Load ``pretrained`` into ``model`` (built with random weights from ``seed``).

    ``pretrained``: None (keep the random weights), a Hugging Face repository id
    (``facebook/sam3``, gated), a local file or an fsspec URI (``s3://...``, read with
    ``storage_options``) of a ``.pt`` or ``.safetensors`` checkpoint.
    """
    if pretrained is None:
        return Sam3Weights(f"random-init:seed={seed}", random=True)
    if is_hub_id(pretrained):
        path = hub_checkpoint(pretrained)
        load_state_strictly(model, read_state_dict(path), f"{pretrained}/{HUB_CHECKPOINT}")
        return Sam3Weights(f"hf:{pretrained}", random=False)
    if "://" not in pretrained or pretrained.startswith("file://"):
        path = pretrained.removeprefix("file://")
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint not found: {pretrained}")
        load_state_strictly(model, read_state_dict(path), pretrained)
        return Sam3Weights(f"sha256:{_sha256(path)}", random=False)
    with tempfile.TemporaryDirectory(prefix="sam3-weights-") as folder:
        path = os.path.join(folder, Path(pretrained.split("?")[0]).name or "checkpoint")
        digest = _fetch(pretrained, path, storage_options)
        load_state_strictly(model, read_state_dict(path), pretrained)
    return Sam3Weights(f"sha256:{digest}", random=False)


def _fetch(uri: str, path: str, storage_options: dict | None) -> str:
    """Stream ``uri`` into ``path``; the sha256 of its bytes."""
    import fsspec

    digest = hashlib.sha256()
    with (
        reading_checkpoint(uri),
        fsspec.open(uri, "rb", **(storage_options or {})) as source,
        open(path, "wb") as out,
    ):
        while chunk := source.read(_READ_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


if __name__ == "__main__":  # python -m cliptrase.sam3.weights REPO: fetch once, print the file
    import sys

    try:
        print(hub_checkpoint(sys.argv[1]))
    except WeightsUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
