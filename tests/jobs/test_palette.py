"""The palette: every class its own colour, none like another or like background."""

from __future__ import annotations

import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab

from jobs.palette import BACKGROUND, CLASS_COLOURS, class_colours, hex_colour

MIN_CLASS_DISTANCE = 4.9  # CIEDE2000 between the two closest of the first 256 class colours
MIN_BACKGROUND_DISTANCE = 30.0  # CIEDE2000 from any class colour to background black


def _lab(rgb: np.ndarray) -> np.ndarray:
    return rgb2lab(rgb[None].astype(np.float64) / 255.0)[0]


def test_the_first_256_class_colours_are_far_apart_and_none_is_background():
    colours = class_colours(CLASS_COLOURS)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    lab = _lab(colours)
    distance = deltaE_ciede2000(lab[:, None], lab[None])
    np.fill_diagonal(distance, np.inf)
    assert distance.min() >= MIN_CLASS_DISTANCE
    assert not (colours == np.array(BACKGROUND, np.uint8)).all(axis=1).any()
    to_background = deltaE_ciede2000(lab, _lab(np.array([BACKGROUND], np.uint8))[0][None])
    assert to_background.min() >= MIN_BACKGROUND_DISTANCE


def test_the_colours_that_looked_like_background_before_are_gone():
    # PASCAL VOC's map (the palette before) drew class 7 in #808080, the background grey,
    # and class 8 in #400000, nearly black.
    colours = class_colours(10, background_label=9)
    assert hex_colour(colours[6]) != "#808080" and hex_colour(colours[9]) == "#000000"
    lab = _lab(colours[:9])
    assert (lab[:, 0] >= 30).all()  # no class is dark: every one reads on a photo


def test_background_takes_its_reserved_colour_and_ids_past_256_repeat():
    colours = class_colours(300, background_label=299)
    assert tuple(colours[299]) == BACKGROUND
    assert (colours[256:299] == colours[0:43]).all()
    assert hex_colour((255, 0, 16)) == "#ff0010"
