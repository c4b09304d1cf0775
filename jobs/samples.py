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


def write_sample_images(directory: str, storage_options: dict | None = None) -> list[str]:
    """Write the sample photos as JPEG files into ``directory`` (a local folder or any fsspec
    URI); return their URIs (sorted)."""
    import io

    from pipeline.store import output_folder

    folder = output_folder(directory, storage_options)
    uris = []
    for name, load in SAMPLE_PHOTOS.items():
        relative = f"{name}.jpg"
        if not folder.store.fs.exists(folder.path(relative)):
            buf = io.BytesIO()
            Image.fromarray(np.asarray(load())).save(buf, format="JPEG", quality=95)
            folder.put(relative, buf.getvalue())
        uris.append(folder.uri(relative) if "://" in directory else os.path.join(directory, relative))
    return sorted(uris)
