"""One factory for every family: a method's name decides which segmentor is built.

``pipeline/`` (the actors, the Ray Data stage) and ``jobs/`` (evaluate, review) build
segmentors only here, and use them only through :class:`cliptrase.protocol.Segmentor`.
"""

from __future__ import annotations

from typing import Any

from .config import FAMILY_DEFAULTS, SegmentorConfig, method_family
from .protocol import Segmentor


def default_model(method: str) -> tuple[str, str]:
    """``(model, weights)`` of a method's family when the user names none."""
    return FAMILY_DEFAULTS[method_family(method)]


def build_segmentor(
    model: str | None = None,
    pretrained: str | None = "default",
    *,
    method: Any = "cliptrase",
    device: str = "auto",
    precision: str | None = None,
    config: SegmentorConfig | None = None,
    storage_options: dict | None = None,
    trust_pickle: bool = False,
    seed: int = 0,
    allow_cpu_autocast: bool = False,
) -> Segmentor:
    """The segmentor of ``method`` (a name, or a CLIP :class:`cliptrase.Method`).

    ``model`` None and ``pretrained`` ``"default"``: the family's (ViT-B-16 with OpenAI's
    weights for the CLIP methods, SAM 3 with ``facebook/sam3`` for the SAM 3 methods);
    ``pretrained`` None: random weights from ``seed``, marked RANDOM in every output.
    ``precision`` None: the family's default (fp32 for the CLIP methods; for the SAM 3
    methods bf16 autocast on CUDA, as their official runs, and fp32 on the CPU).
    """
    family = method_family(method) if isinstance(method, str) else "clip"
    family_model, family_weights = FAMILY_DEFAULTS[family]
    model = family_model if model is None else model
    pretrained = family_weights if pretrained == "default" else pretrained
    if family == "plugin":
        return _plugin(
            method, model=model, pretrained=pretrained, device=device, precision=precision,
            config=config, storage_options=storage_options, seed=seed,
        )  # fmt: skip
    if family == "clip":
        from .segmentor import load_segmentor

        return load_segmentor(
            model,
            pretrained=pretrained,
            device=device,
            precision=precision or "fp32",
            method=method,
            config=config,
            storage_options=storage_options,
            trust_pickle=trust_pickle,
            seed=seed,
            allow_cpu_autocast=allow_cpu_autocast,
        )
    from .sam3 import load_sam3_segmentor

    return load_sam3_segmentor(
        model,
        pretrained=pretrained,
        method=method,
        device=device,
        precision=precision,
        config=config,
        storage_options=storage_options,
        seed=seed,
    )


def _plugin(method: str, **kwargs: Any) -> Segmentor:
    """``"package.module:builder"``: ``builder(model=, pretrained=, device=, precision=,
    config=, storage_options=, seed=)`` must return a :class:`Segmentor`."""
    import importlib

    module_name, _, name = method.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"method {method!r}: cannot import {name} from {module_name} ({err})"
        ) from None
    segmentor = builder(**kwargs)
    if not isinstance(segmentor, Segmentor):
        raise TypeError(f"method {method!r} built a {type(segmentor).__name__}, not a Segmentor")
    return segmentor
