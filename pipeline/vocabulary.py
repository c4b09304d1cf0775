"""The compiled vocabulary, shared by every actor of a run through the run's output root.

Compiling a vocabulary runs the text tower over every class x template prompt: ~23 s for 10
classes x 80 templates on a CPU, minutes for 150 classes, in every actor at every start.
:func:`compiled_vocabulary` computes it once and stores the embeddings under
``<output>/<config hash>/_vocabulary/<key>.safetensors``, where ``key``
(:func:`vocabulary_key`) hashes everything the embeddings depend on; later actors load the
file. When N actors start together, the first to create ``<key>.computing.json`` (exclusive
create, as leases are) computes and heartbeats that claim; the others poll for the finished file
and compute themselves only if it never comes or the claim goes stale. The cache never fails
an actor: a file that is absent, unreadable, corrupt or mismatched is logged and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
from collections.abc import Sequence

import torch

from cliptrase.names import validate_names, validate_synonyms
from cliptrase.protocol import CompiledVocabulary, Segmentor

from .layout import RunLayout
from .leases import new_owner, owner_is_dead
from .retries import with_retries

log = logging.getLogger("pipeline")

# Bump when what a stored file means changes (the embedding formula, the file's layout): every
# existing cache file then misses and is recomputed.
FORMAT_VERSION = 1
DTYPE = torch.float32  # floating tensors are cached in float32 only
DEFAULT_WAIT_S = 600.0  # waiters give up on a live claim after this long and compute themselves
DEFAULT_POLL_S = 0.5
DEFAULT_STALE_S = 120.0  # a claim whose heartbeat is older than this is abandoned


def vocabulary_dir(layout: RunLayout) -> str:
    return f"{layout.root}/_vocabulary"


def vocabulary_path(layout: RunLayout, key: str) -> str:
    return f"{vocabulary_dir(layout)}/{key}.safetensors"


def claim_path(layout: RunLayout, key: str) -> str:
    return f"{vocabulary_dir(layout)}/{key}.computing.json"


# ----------------------------------------------------------------------------- the key


def _canonical(vocabulary_spec) -> tuple[tuple, tuple, tuple]:
    """``(classes, background, synonyms)`` as a segmentor's ``vocabulary`` normalises them."""
    classes, background = validate_names(vocabulary_spec.classes, vocabulary_spec.background)
    synonyms = validate_synonyms(classes, background, vocabulary_spec.synonyms or None)
    return classes, background, synonyms


def vocabulary_key(segmentor: Segmentor, vocabulary_spec) -> str:
    """sha256 (hex) of everything the compiled vocabulary depends on: the segmentor's
    :meth:`~cliptrase.protocol.Segmentor.vocabulary_fingerprint` (model, weights, templates,
    device type, dtype...), the classes, background words and synonyms, and
    :data:`FORMAT_VERSION`."""
    classes, background, synonyms = _canonical(vocabulary_spec)
    identity = {
        "format": FORMAT_VERSION,
        **segmentor.vocabulary_fingerprint(vocabulary_spec.templates),
        "classes": list(classes),
        "background": list(background),
        "synonyms": [list(s) for s in synonyms],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- the file


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encode_file(
    key: str, prompts: Sequence[str], tensors: dict[str, torch.Tensor], **extra: str
) -> bytes:
    """The safetensors bytes of one compiled vocabulary (tensors stored as they are)."""
    import safetensors.torch

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {
        "format": str(FORMAT_VERSION),
        "key": key,
        "prompts": json.dumps(list(prompts)),
        "sha256": _digest(tensors),
        **{k: str(v) for k, v in extra.items()},
    }
    return safetensors.torch.save(tensors, metadata)


def _header_metadata(data: bytes) -> dict[str, str]:
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError("safetensors header runs past the end of the file")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def decode_file(data: bytes, key: str, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors in ``data``; raises ValueError unless it is this key's, whole and sound
    (each tensor a row per prompt, floats in float32). Whether they fit the segmentor is
    :meth:`~cliptrase.protocol.Segmentor.vocabulary_from_tensors`'s to say."""
    import safetensors.torch

    metadata = _header_metadata(data)
    if metadata.get("format") != str(FORMAT_VERSION):
        raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT_VERSION}")
    if metadata.get("key") != key:
        raise ValueError(f"key {metadata.get('key')!r} in the file, expected {key}")
    if json.loads(metadata.get("prompts", "null")) != list(prompts):
        raise ValueError("its prompts are not this vocabulary's")
    tensors = safetensors.torch.load(data)
    for name, tensor in tensors.items():
        if tensor.ndim < 1 or tensor.shape[0] != len(prompts):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, not a row per prompt")
        if tensor.is_floating_point() and tensor.dtype != DTYPE:
            raise ValueError(f"{name}: dtype {tensor.dtype}, expected {DTYPE}")
    if _digest(tensors) != metadata.get("sha256"):
        raise ValueError("the tensors' sha256 does not match the one recorded")
    return tensors


# ----------------------------------------------------------------------------- the claim


class _Claim:
    """Our ``computing`` claim: created exclusively, heartbeated while we compute, removed."""

    def __init__(self, layout: RunLayout, path: str, owner: str, stale_s: float):
        self.layout, self.path, self.owner, self.stale_s = layout, path, owner, stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        return json.dumps({"owner": self.owner, "heartbeat_at": time.time()}).encode()

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="vocabulary-claim", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(self.stale_s / 4, 0.05)):
            try:
                if (_read_claim(self.layout, self.path) or {}).get("owner") == self.owner:
                    self.layout.store.put_whole(self.path, self.body())
            except Exception as exc:  # noqa: BLE001 - a missed beat only risks a second compute
                log.debug("vocabulary claim heartbeat failed: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (_read_claim(self.layout, self.path) or {}).get("owner") == self.owner:
                self.layout.store.remove(self.path)
        except Exception as exc:  # noqa: BLE001 - a leftover claim goes stale on its own
            log.warning("could not remove the vocabulary claim %s: %s", self.path, exc)


def _read_claim(layout: RunLayout, path: str) -> dict | None:
    return layout.store.read_json(path)


def _is_stale(claim: dict, stale_s: float) -> bool:
    heartbeat = claim.get("heartbeat_at")
    if not isinstance(heartbeat, (int, float)) or time.time() - heartbeat > stale_s:
        return True
    return owner_is_dead(str(claim.get("owner", "")))


def _try_claim(layout: RunLayout, path: str, claim: _Claim) -> str:
    """``"ours"``, ``"theirs"`` (a live claim by someone else) or ``"none"`` (this store cannot
    create exclusively, or the claim failed: compute without coordinating)."""
    for _ in range(2):
        created = layout.store.create_exclusive(path, claim.body())
        if created is True:
            return "ours"
        if created is None:
            return "none"
        current = _read_claim(layout, path)
        if current is None:
            return "theirs"  # being written or just removed: look again at the next poll
        if not _is_stale(current, claim.stale_s):
            return "theirs"
        log.info("vocabulary claim %s is stale (%s); taking it over", path, current.get("owner"))
        layout.store.remove(path)
    return "theirs"


# ----------------------------------------------------------------------------- the entry point


def compiled_vocabulary(
    segmentor: Segmentor,
    vocabulary_spec,
    layout: RunLayout,
    *,
    wait_s: float = DEFAULT_WAIT_S,
    poll_s: float = DEFAULT_POLL_S,
    stale_s: float = DEFAULT_STALE_S,
) -> CompiledVocabulary:
    """``segmentor.vocabulary(...)`` of ``vocabulary_spec``, computed once per run root.

    Loads ``_vocabulary/<key>.safetensors`` under ``layout`` when it is this key's and sound
    (key, prompts, shapes, dtype and checksum, and the segmentor accepts its tensors); else
    one caller computes and stores it while concurrent callers wait up to ``wait_s`` for the
    file (polling every ``poll_s``), giving up early when the computing claim's heartbeat is
    older than ``stale_s``. Storage errors are logged, never raised; the tensors returned are
    on ``segmentor.device``, bit for bit what this segmentor computes.
    """
    classes, background, synonyms = _canonical(vocabulary_spec)
    prompts = row_prompts(classes, background, synonyms)
    try:
        key = vocabulary_key(segmentor, vocabulary_spec)
    except Exception as exc:  # noqa: BLE001 - e.g. a template that fails on the probe names
        log.warning("vocabulary cache: no key (%s); computing", exc)
        return _compute(segmentor, vocabulary_spec)
    path = vocabulary_path(layout, key)

    def load() -> CompiledVocabulary | None:
        tensors = _load(layout, path, key, prompts)
        if tensors is None:
            return None
        try:
            return segmentor.vocabulary_from_tensors(
                classes, background, synonyms, vocabulary_spec.templates, tensors
            )
        except ValueError as exc:  # another model's, or mangled: recompute
            log.warning("vocabulary cache: %s is unusable (%s); recomputing it", path, exc)
            return None

    vocab = load()
    if vocab is not None:
        log.info(
            "vocabulary: loaded %d rows from %s", len(prompts), layout.fs.unstrip_protocol(path)
        )
        return vocab

    claim = _Claim(layout, claim_path(layout, key), new_owner(), stale_s)
    state = _claim_or_wait(layout, claim, load, wait_s, poll_s)
    if not isinstance(state, str):  # the vocabulary someone else stored
        return state
    if state == "ours":
        vocab = load()  # the file may have landed between our last look and our claim
        if vocab is not None:
            claim.release()
            return vocab
        claim.start_heartbeat()
    try:
        started = time.perf_counter()
        vocab = _compute(segmentor, vocabulary_spec)
        log.info(
            "vocabulary: computed %d rows in %.1fs (key %s)",
            len(prompts),
            time.perf_counter() - started,
            key[:12],
        )
        if list(vocab.prompts) != prompts:
            raise RuntimeError(f"{type(segmentor).__name__} orders its prompts differently")
        _store(layout, path, key, prompts, segmentor.vocabulary_tensors(vocab), segmentor)
    finally:
        if state == "ours":
            claim.release()  # after the file is stored, so waiters find it rather than no claim
    return vocab


def _claim_or_wait(layout, claim: _Claim, load, wait_s: float, poll_s: float):
    """``"ours"``, ``"none"`` (compute without a claim) or the Vocabulary someone else stored."""
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            state = _try_claim(layout, claim.path, claim)
        except Exception as exc:  # noqa: BLE001 - the cache never fails the actor
            log.warning("vocabulary cache: could not claim %s (%s); computing", claim.path, exc)
            return "none"
        if state != "theirs":
            return state
        if not waited:
            log.info("vocabulary: another actor is computing it; waiting up to %.0fs", wait_s)
            waited = True
        if time.monotonic() >= deadline:
            log.warning("vocabulary: not stored after %.0fs; computing it here", wait_s)
            return "none"
        time.sleep(poll_s)
        vocab = load()
        if vocab is not None:
            return vocab


def row_prompts(classes: Sequence[str], background: Sequence[str], synonyms) -> list[str]:
    """The rows of a compiled vocabulary, in every family's order: the classes, the background
    words, then each class's synonyms in class order (``CompiledVocabulary.prompts``)."""
    return list(classes) + list(background) + [s for extra in synonyms for s in extra]


def _compute(segmentor: Segmentor, vocabulary_spec) -> CompiledVocabulary:
    spec = vocabulary_spec
    return segmentor.vocabulary(
        spec.classes, spec.background, spec.templates, synonyms=spec.synonyms or None
    )


def _load(layout: RunLayout, path: str, key: str, prompts) -> dict[str, torch.Tensor] | None:
    try:
        data = with_retries(layout.store.read, path)
    except Exception as exc:  # noqa: BLE001 - unreadable: compute instead
        log.warning("vocabulary cache: could not read %s (%s)", path, exc)
        return None
    if data is None:
        return None
    try:
        return decode_file(data, key, prompts)
    except Exception as exc:  # noqa: BLE001 - corrupt or another vocabulary's: recompute
        log.warning("vocabulary cache: %s is unusable (%s); recomputing it", path, exc)
        return None


def _store(layout: RunLayout, path: str, key: str, prompts, tensors, segmentor) -> None:
    try:
        floats = [t for t in tensors.values() if t.is_floating_point()]
        if any(t.dtype != DTYPE for t in floats):
            log.warning("vocabulary cache: %s tensors are not cached", floats[0].dtype)
            return
        identity = segmentor.identity
        data = encode_file(
            key, prompts, tensors, model=identity.model, weights_identity=identity.weights
        )
        with_retries(layout.store.put_whole, path, data)
    except Exception as exc:  # noqa: BLE001 - the next actor computes it again
        log.warning("vocabulary cache: could not store %s (%s)", path, exc)


__all__ = [
    "FORMAT_VERSION",
    "compiled_vocabulary",
    "vocabulary_key",
    "vocabulary_path",
]
