"""The bundled sample photos (scikit-image's data) as a local folder shard, for the demo run."""

from __future__ import annotations

import os

import numpy as np
import skimage.data
from PIL import Image

# Photos that ship inside the scikit-image wheel (no download), with what they show.
SAMPLE_PHOTOS = {
    "astronaut": skimage.data.astronaut,  # a person, a flag, a rocket model
    "chelsea": skimage.data.chelsea,  # a cat
    "coffee": skimage.data.coffee,  # a cup of coffee on a table
    "rocket": skimage.data.rocket,  # a rocket on its pad, sky
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],  # a motorcycle indoors
    "camera": skimage.data.camera,  # grayscale: a man with a camera, grass, sky
}

SAMPLE_CLASSES = ("person", "cat", "cup", "rocket", "motorcycle", "camera", "flag", "table")
SAMPLE_BACKGROUND = ("background", "sky", "wall", "floor", "grass", "tree", "building")


def write_sample_images(directory: str) -> list[str]:
    """Write the sample photos as JPEG files into ``directory``; return their paths (sorted)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, load in SAMPLE_PHOTOS.items():
        path = os.path.join(directory, f"{name}.jpg")
        if not os.path.exists(path):
            pixels = np.asarray(load())
            Image.fromarray(pixels).save(path, quality=95)
        paths.append(path)
    return sorted(paths)
