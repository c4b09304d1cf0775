from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import cliptrase


@pytest.fixture(scope="session")
def tiny():
    """The 3-block test ViT with fixed random weights: every code path, in milliseconds."""
    return cliptrase.load_segmentor("ViT-Tiny-16-test", pretrained=None, device="cpu")


# Every device this machine has: tests that compare a device's output with the CPU reference
# are parametrised over these (CUDA runs where a GPU is present, and is skipped otherwise).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    ),
]


def on_device(seg, device: str):
    """The same model, weights, method and config on ``device`` (a copy of the CLIP model)."""
    if device == "cpu" and seg.device.type == "cpu":
        return seg
    import copy

    return cliptrase.Segmentor(
        copy.deepcopy(seg.clip),
        seg.model_name,
        seg.weights,
        method=seg.method,
        device=device,
        config=seg.config,
    )


@pytest.fixture(scope="session")
def vit_b16():
    """ViT-B/16 with fixed random weights, for tests where real shapes matter."""
    return cliptrase.load_segmentor("ViT-B-16", pretrained=None, device="cpu")


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    return skimage.data.chelsea()


def parity_pixels(seg, photo: np.ndarray, size: int) -> torch.Tensor:
    """The reference evaluation input (spec section 9) as a (1, 3, S, S) tensor."""
    return cliptrase.parity_transform(size, seg.mean, seg.std)(Image.fromarray(photo))[None]
