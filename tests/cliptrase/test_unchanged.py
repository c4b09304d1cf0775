"""CLIPtrase's outputs are frozen: a stored label map and confidence from a fixed random model.

The fixture (``data/cliptrase_expected.npz``, ~11 KB) was written by the pre-refactor code
(commit ce3c82d) from the seed-0 ``ViT-Tiny-16-test`` model: a 32x32 photo (whole-image path,
short side 336, the published DBSCAN pair at 441 patches) and a 16x80 strip (sliding windows
with per-window clustering). Labels must match exactly. Confidence is compared to 1e-6: its
float sums depend on torch's thread count in the last bit (measured: 2.4e-7 between 1 and 2
threads), not on our code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "data" / "cliptrase_expected.npz"
VOCAB = (["person", "rocket", "cat", "grass"], ["background", "wall", "sky"])


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE))


def test_cliptrase_whole_image_output_is_unchanged(tiny, expected):
    result = tiny.segment(expected["image"], tiny.vocabulary(*VOCAB))
    np.testing.assert_array_equal(result.labels, expected["labels"])
    np.testing.assert_allclose(result.confidence, expected["confidence"], atol=1e-6, rtol=0)
    assert len(np.unique(expected["labels"])) > 1


def test_cliptrase_windowed_output_is_unchanged(tiny, expected):
    result = tiny.segment(expected["panorama"], tiny.vocabulary(*VOCAB))
    assert result.windows == 7
    np.testing.assert_array_equal(result.labels, expected["panorama_labels"])
