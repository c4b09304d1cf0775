"""CLIPtrase's outputs are frozen: a stored label map and confidence from a fixed random model.

The fixture (``data/cliptrase_expected.npz``, ~11 KB) was written by the pre-refactor code
(commit ce3c82d) from the seed-0 ``ViT-Tiny-16-test`` model: a 32x32 photo (whole-image path,
short side 336, the published DBSCAN pair at 441 patches) and a 16x80 strip (sliding windows
with per-window clustering). It is the processing-resolution behaviour, now
``SegmentorConfig(resolution="processing")``, computed on the device in torch since. Labels must
match exactly. Confidence is now kept as ``round(255 c)`` at the processing resolution and
stretched to the original size: within half a step (0.5/255) of the fixture's float map.
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


def test_cliptrase_whole_image_output_is_unchanged(legacy, expected):
    result = legacy.segment(expected["image"], legacy.vocabulary(*VOCAB))
    np.testing.assert_array_equal(result.labels, expected["labels"])
    # Stored as round(255 c) at the processing resolution, then stretched: half a step at most.
    np.testing.assert_allclose(result.confidence, expected["confidence"], atol=0.5 / 255 + 1e-6)
    assert len(np.unique(expected["labels"])) > 1


def test_cliptrase_windowed_output_is_unchanged(legacy, expected):
    result = legacy.segment(expected["panorama"], legacy.vocabulary(*VOCAB))
    assert result.windows == 7
    np.testing.assert_array_equal(result.labels, expected["panorama_labels"])
