"""One palette for every picture of a run: overlays, the report and its class-area chart, and
the Label Studio and CVAT label maps.

Class ``i`` is drawn in colour ``i`` of colorcet's ``glasbey_light``: 256 colours spaced for
the eye (Glasbey et al.'s method in a perceptual colour space), none dark, so that a colour
blended over a photo stays legible. Its nearest two colours are 4.9 CIEDE2000 units apart
(tests/jobs/test_palette.py). The pooled background label is drawn in black, which no class
gets (every class colour is at least 30 units from it), as CVAT and PASCAL VOC draw
background. Past 256 labels the colours repeat.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

BACKGROUND = (0, 0, 0)
CLASS_COLOURS = 256  # distinct colours; label ids past them repeat


@lru_cache(maxsize=1)
def _glasbey() -> np.ndarray:
    import colorcet

    return np.array(
        [[int(code[i : i + 2], 16) for i in (1, 3, 5)] for code in colorcet.glasbey_light],
        np.uint8,
    )


def class_colours(num_labels: int, background_label: int | None = None) -> np.ndarray:
    """``(num_labels, 3)`` uint8: label ``i``'s colour; ``background_label`` (the pooled
    background, when the run has background words) in :data:`BACKGROUND`."""
    colours = _glasbey()[np.arange(num_labels) % CLASS_COLOURS].copy()
    if background_label is not None:
        colours[background_label] = BACKGROUND
    return colours


def hex_colour(rgb) -> str:
    """``#rrggbb``."""
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))
