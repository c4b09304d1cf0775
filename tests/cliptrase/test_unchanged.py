"""CLIPtrase's outputs are frozen: a stored label map and confidence from a fixed random model.

The fixture (``data/cliptrase_expected.npz``, ~11 KB) was written by the pre-refactor code
(commit ce3c82d) from the seed-0 ``ViT-Tiny-16-test`` model: a 32x32 photo (whole-image path,
short side 336, the published DBSCAN pair at 441 patches) and a 16x80 strip (sliding windows
with per-window clustering). It is the processing-resolution behaviour, now
``SegmentorConfig(resolution="processing")``, computed on the device in torch since. Labels must
match exactly. Confidence is stored as ``round(255 c)``: it must equal the fixture's float
confidence so quantised, except by one step where the float sits within 1e-5 of a rounding
boundary (its sums depend on torch's thread count in the last bit, measured 2.4e-7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import cliptrase

FIXTURE = Path(__file__).parent / "data" / "cliptrase_expected.npz"
VOCAB = (["person", "rocket", "cat", "grass"], ["background", "wall", "sky"])


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE))


@pytest.fixture(scope="module")
def legacy(tiny):
    return tiny.variant(config=cliptrase.SegmentorConfig(resolution="processing"))


def assert_quantised_equal(confidence_u8: np.ndarray, confidence: np.ndarray) -> None:
    scaled = confidence.astype(np.float32) * 255.0
    expected = np.rint(scaled)
    off = confidence_u8.astype(np.int64) != expected
    near_half = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-5 * 255
    assert not (off & ~near_half).any()
    assert np.abs(confidence_u8 - expected).max() <= 1


def test_cliptrase_whole_image_output_is_unchanged(legacy, expected):
    result = legacy.segment(expected["image"], legacy.vocabulary(*VOCAB))
    np.testing.assert_array_equal(result.labels, expected["labels"])
    assert_quantised_equal(result.confidence_u8, expected["confidence"])
    assert len(np.unique(expected["labels"])) > 1


def test_cliptrase_windowed_output_is_unchanged(legacy, expected):
    result = legacy.segment(expected["panorama"], legacy.vocabulary(*VOCAB))
    assert result.windows == 7
    np.testing.assert_array_equal(result.labels, expected["panorama_labels"])
