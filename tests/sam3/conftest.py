"""Fixtures of the SAM 3 family's tests: one tiny random SAM 3 (Meta's classes, a few million
parameters) shared by every method, and small real photographs."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

# A vocabulary with every row kind: classes, a synonym, background words.
CLASSES = ["person", "cat", "grass", "sky", "tvmonitor"]
SYNONYMS = [["human"], [], [], [], []]
BACKGROUND = ["wall", "floor"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops take microseconds: with intra-op threads on a shared CPU each one
    waits for a thread wake-up instead (25x slower on 2 busy cores). Restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny():
    """``sam3-tiny`` with random weights (seed 0), SegEarth-OV3's method, on the CPU."""
    from cliptrase.sam3 import load_sam3_segmentor

    return load_sam3_segmentor("sam3-tiny", pretrained=None, method="segearthov3", device="cpu")


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return image.resize(size, Image.BILINEAR)


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Four photographs of different sizes and aspects (64-96 px)."""
    return [
        _photo("astronaut", (80, 64)),
        _photo("chelsea", (96, 72)),
        _photo("coffee", (64, 80)),
        _photo("rocket", (72, 72)),
    ]


@pytest.fixture(scope="session")
def astronaut_array() -> np.ndarray:
    return np.array(_photo("astronaut", (80, 64)))
