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
