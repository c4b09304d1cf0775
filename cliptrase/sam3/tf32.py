"""TF32: keep ``import sam3`` from changing the process, and give SAM 3's forwards what the
official runs had.

``sam3/model_builder.py:46-55`` (``_setup_tf32``, run at import: ``sam3/__init__.py`` imports
the builder, so *any* ``import sam3...`` runs it) sets ``torch.backends.cuda.matmul.allow_tf32``
and ``torch.backends.cudnn.allow_tf32`` on GPUs of compute capability >= 8. That would change
the float32 matmuls of everything else in the process (the CLIP family's fp32 path among
them), so :func:`preserved_tf32_flags` puts the flags back after the import.

The official SAM 3 runs (SegEarth-OV3, ActiveSAM, Meta's notebooks) all import the builder, so
their fp32 work ran in TF32 on Ampere and later: under bf16 autocast that is the ops autocast
keeps in float32 (the decoder FFN, which ``sam3/model/decoder.py:73-78`` runs with autocast
disabled; ActiveSAM's fp32 ``resizer`` projection of its context tokens). :func:`sam3_tf32`
turns TF32 on for the duration of a SAM 3 forward only.

torch (2.9+) raises when the legacy flags (``allow_tf32``) and the per-backend
``fp32_precision`` API are mixed and then read without a backend name, so the snapshot reads
only the per-backend values plus ``get_float32_matmul_precision`` (the legacy matmul switch,
which torch keeps consistent with itself), and the restore sets them back in that order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# The per-backend switches (torch.backends.*.fp32_precision) a snapshot records.
_BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn")


def _backend(path: str):
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def tf32_flags() -> dict[str, str | None]:
    """The process's TF32 switches: ``matmul_precision`` (None when torch refuses to read it
    because the APIs were mixed) and each backend's ``fp32_precision``."""
    try:
        matmul = torch.get_float32_matmul_precision()
    except RuntimeError:
        matmul = None
    flags: dict[str, str | None] = {"matmul_precision": matmul}
    for path in _BACKENDS:
        flags[path] = _backend(path).fp32_precision
    return flags


def restore_tf32_flags(flags: dict[str, str | None]) -> None:
    """Put back a :func:`tf32_flags` snapshot (only what differs)."""
    if flags["matmul_precision"] is not None:
        try:
            current = torch.get_float32_matmul_precision()
        except RuntimeError:
            current = None
        if current != flags["matmul_precision"]:
            torch.set_float32_matmul_precision(flags["matmul_precision"])
    for path in _BACKENDS:
        backend = _backend(path)
        if backend.fp32_precision != flags[path]:
            backend.fp32_precision = flags[path]


@contextlib.contextmanager
def preserved_tf32_flags() -> Iterator[None]:
    """The TF32 switches as they were before the block, whatever it set."""
    before = tf32_flags()
    try:
        yield
    finally:
        restore_tf32_flags(before)


def official_runs_use_tf32(device: torch.device) -> bool:
    """Whether ``_setup_tf32`` (``sam3/model_builder.py:46-55``) would have turned TF32 on
    for this device: CUDA of compute capability 8 or more."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).major >= 8


@contextlib.contextmanager
def sam3_tf32(device: torch.device) -> Iterator[None]:
    """TF32 matmuls and convolutions inside the block where the official runs had them; the
    process's switches are restored after. The switches are process-wide: one thread runs
    the model (as the pipeline's actors do)."""
    if not official_runs_use_tf32(device):
        yield
        return
    with preserved_tf32_flags():
        # The legacy switch, as _setup_tf32 sets it (allow_tf32 = True is "high").
        torch.set_float32_matmul_precision("high")
        _backend("cudnn.conv").fp32_precision = "tf32"
        _backend("cudnn.rnn").fp32_precision = "tf32"
        yield


@contextlib.contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """IEEE float32 matmuls and convolutions inside the block on CUDA (torch lets cuDNN
    convolutions run in TF32 by default): what ``precision="fp32"`` promises."""
    if device.type != "cuda":
        yield
        return
    with preserved_tf32_flags():
        torch.set_float32_matmul_precision("highest")
        _backend("cudnn.conv").fp32_precision = "ieee"
        _backend("cudnn.rnn").fp32_precision = "ieee"
        yield
