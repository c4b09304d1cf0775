"""Where CLIP weights come from: open_clip pretrained tags, local files, fsspec URIs.

The model code never touches disk or network; this module does, once, at load time.
Checkpoints are read without executing code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from .errors import (
    CheckpointError,
    UnsupportedModelError,
    WeightsUnavailableError,
    reading_checkpoint,
)
from .hub import not_cached_message, offline_if_unreachable
from .names import is_pretrained_tag

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

# Keys of an OpenAI (JIT-era) CLIP state dict that are metadata, not parameters.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class WeightsInfo:
    """What weights a model carries, for provenance in outputs."""

    source: str  # "random", "pretrained-tag", "file"
    identity: str  # e.g. "open_clip:ViT-B-16/openai", "sha256:...", "random-init:seed=0"

    @property
    def random(self) -> bool:
        return self.source == "random"


def _is_local_or_uri(pretrained: str) -> bool:
    return not is_pretrained_tag(pretrained)


def create_clip_model(
    model: str,
    pretrained: str | None,
    seed: int = 0,
    trust_pickle: bool = False,
    storage_options: dict | None = None,
) -> tuple[torch.nn.Module, WeightsInfo]:
    """Build an open_clip model with weights from a tag, a local file, an fsspec URI, or none.

    ``pretrained=None`` gives random weights drawn from a fixed ``seed``, so every actor of a
    job and every re-run build the same model.
    """
    if model not in open_clip.list_models():
        raise UnsupportedModelError(
            f"unknown open_clip model {model!r}; see open_clip.list_models() for the names"
        )
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = open_clip.create_model(model, pretrained=None)
        return clip, WeightsInfo("random", f"random-init:seed={seed}")
    if _is_local_or_uri(pretrained):
        clip = open_clip.create_model(model, pretrained=None)
        digest = load_checkpoint_into(clip, pretrained, storage_options, trust_pickle=trust_pickle)
        return clip, WeightsInfo("file", f"sha256:{digest}")
    return _create_from_tag(model, pretrained), WeightsInfo(
        "pretrained-tag", f"open_clip:{model}/{pretrained}"
    )


def _create_from_tag(model: str, tag: str) -> torch.nn.Module:
    known = open_clip.list_pretrained_tags_by_model(model)
    if tag not in known:
        raise CheckpointError(
            f"open_clip has no pretrained tag {tag!r} for {model!r} (known: {sorted(known)}); "
            "to load your own weights pass a local path or a URI such as s3://bucket/ckpt.safetensors"
        )
    # OpenAI's weights were trained with QuickGELU; open_clip only warns on a mismatch.
    quick_gelu = bool(open_clip.get_pretrained_cfg(model, tag).get("quick_gelu", False))
    offline = offline_if_unreachable()
    try:
        return open_clip.create_model(
            model, pretrained=tag, require_pretrained=True, force_quick_gelu=quick_gelu
        )
    except (OSError, RuntimeError, ValueError) as exc:  # network, hub and cache errors
        if offline:
            raise WeightsUnavailableError(not_cached_message(f"{model}/{tag}")) from exc
        raise WeightsUnavailableError(
            f"could not fetch open_clip weights {model}/{tag} ({type(exc).__name__}: {exc}). "
            "Offline? Download the checkpoint elsewhere and pass its local path or URI as "
            "pretrained= (CLI: --weights /path/to/open_clip_model.safetensors), or pass "
            "pretrained=None (CLI: --random-weights) for a plumbing check with random weights."
        ) from exc


def read_checkpoint_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """Read a checkpoint from a local path or any fsspec URI (``s3://``, ``gs://``, ...)."""
    import fsspec

    with reading_checkpoint(uri), fsspec.open(uri, "rb", **(storage_options or {})) as f:
        return f.read()


def parse_checkpoint(data: bytes, name: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Decode checkpoint bytes into a flat state dict, without executing code by default."""
    if data[:2] == b"PK" or name.endswith((".pt", ".pth", ".bin", ".ckpt")):
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as exc:
            reason = _unpickling_reason(exc)
            if "global" not in reason.lower():
                raise CheckpointError(
                    f"{name} is not a readable torch checkpoint: {reason}"
                ) from exc
            raise CheckpointError(
                f"{name} is a pickle that needs code execution to load, which is refused "
                f"({reason}). Convert it to safetensors, or pass trust_pickle=True (CLI: "
                "--trust-pickle) only if you trust where it came from."
            ) from exc
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{name} is not a readable torch checkpoint: {exc}") from exc
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            obj = load_safetensors(data)
        except (SafetensorError, ValueError, OSError) as exc:
            raise CheckpointError(f"{name} is not a readable safetensors file: {exc}") from exc
    return normalise_state_dict(obj, name)


def _unpickling_reason(exc: Exception) -> str:
    """The one informative line of torch's long weights-only message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line.upper() or line.startswith("Unsupported"):
            return line
    return lines[-1] if lines else type(exc).__name__


def normalise_state_dict(obj: object, name: str) -> dict[str, torch.Tensor]:
    """Accept the OpenAI layout and open_clip's training layout; return model keys."""
    if isinstance(obj, torch.jit.ScriptModule):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj:  # open_clip training checkpoint
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{name} holds no state dict")
    state = {}
    for key, value in obj.items():
        if key in _OPENAI_METADATA_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: entry {key!r} is not a tensor")
        state[key.removeprefix("module.")] = value
    return state


def load_checkpoint_into(
    clip: torch.nn.Module,
    uri: str,
    storage_options: dict | None = None,
    trust_pickle: bool = False,
) -> str:
    """Load a checkpoint into ``clip`` (strictly); return the sha256 of its bytes."""
    data = read_checkpoint_bytes(uri, storage_options)
    state = parse_checkpoint(data, uri, trust_pickle=trust_pickle)
    # open_clip converts third-party layouts (e.g. custom-text towers) in place.
    state = open_clip.factory.convert_state_dict(clip, state)
    if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
        state = open_clip.factory.convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != clip.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{uri} does not fit this model architecture: {str(exc).splitlines()[0]} "
            f"({_describe_mismatch(clip, state)})"
        ) from exc
    return hashlib.sha256(data).hexdigest()


def _describe_mismatch(clip: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    expected = clip.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(state) if expected[k].shape != state[k].shape
    )
    parts = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", wrong_shape),
    ):
        if keys:
            parts.append(f"{len(keys)} {label}, e.g. {keys[:3]}")
    return "; ".join(parts) or "see the error above"


def resolve_pretrained_file(model: str, tag: str) -> str:
    """The local file of open_clip's ``model``/``tag`` weights, downloaded into the hub cache
    if needed (a job's driver calls this once, before any actor starts)."""
    if model not in open_clip.list_models():
        raise UnsupportedModelError(
            f"unknown open_clip model {model!r}; see open_clip.list_models() for the names"
        )
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        known = sorted(open_clip.list_pretrained_tags_by_model(model))
        raise CheckpointError(
            f"open_clip has no pretrained tag {tag!r} for {model!r} (known: {known})"
        )
    offline = offline_if_unreachable()
    try:
        path = open_clip.download_pretrained(cfg)
    except Exception as exc:  # noqa: BLE001 - network, hub and cache errors alike
        if offline:
            raise WeightsUnavailableError(not_cached_message(f"{model}/{tag}")) from exc
        raise WeightsUnavailableError(
            f"could not fetch open_clip weights {model}/{tag} ({type(exc).__name__}: "
            f"{_last_line(str(exc))})"
        ) from exc
    if not path:
        raise WeightsUnavailableError(f"could not fetch open_clip weights {model}/{tag}")
    return path


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else text


if __name__ == "__main__":  # python -m cliptrase.weights MODEL TAG: print the resolved file
    import sys

    try:
        print(resolve_pretrained_file(sys.argv[1], sys.argv[2]))
    except (CheckpointError, UnsupportedModelError, WeightsUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
