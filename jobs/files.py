"""What the jobs write for one image: a safe file name for its id, and its source image as
stored beside a training mask (upright, in the format asked for)."""

from __future__ import annotations

import hashlib
import io
import re

from PIL import Image, ImageOps

_IMAGE_EXTENSIONS = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "GIF": ".gif",
    "TIFF": ".tif",
}


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_COMPONENT = 100


def safe_name(image_id: str) -> str:
    """A relative POSIX path for an image id that cannot leave the export folder.

    Each ``/``-separated component keeps ``[A-Za-z0-9._-]`` (others become ``_``); empty,
    ``.`` and ``..`` components become ``_``; backslashes are separators of nothing. When this
    changed anything, a hash of the id is appended to the last component, so two ids never
    share a name (``a b`` and ``a_b`` differ).
    """
    parts = []
    for part in image_id.split("/"):
        clean = _UNSAFE_CHARS.sub("_", part)
        if clean in ("", ".", "..") or set(clean) == {"."}:
            clean = "_"
        parts.append(clean[:_MAX_COMPONENT])
    name = "/".join(parts)
    if name != image_id:
        digest = hashlib.sha1(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        name = f"{name}-{digest}"
    return name


def training_image(data: bytes, exif_transposed: bool, image_format: str = "original"):
    """``(bytes, extension)`` of a source image as stored beside its mask.

    Masks are at the upright (EXIF-applied) size; an image stored sideways with an EXIF
    orientation is re-encoded upright without it, so every reader (PIL ignores EXIF, OpenCV
    applies it) sees pixels that match the mask. ``image_format`` "png"/"jpg" re-encodes all.
    """
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format or "PNG"
        target = {"original": fmt, "png": "PNG", "jpg": "JPEG"}[image_format]
        if not exif_transposed and target == fmt:
            return data, _IMAGE_EXTENSIONS.get(fmt, f".{fmt.lower()}")
        image = ImageOps.exif_transpose(im) if exif_transposed else im.copy()
    if target == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=target, **({"quality": 95} if target == "JPEG" else {}))
    return buf.getvalue(), _IMAGE_EXTENSIONS.get(target, f".{target.lower()}")


class ExportNames:
    """The file name (no extension) of each exported image: its id made safe, without the
    image extension a loose file's key ends with (``rocket.jpg`` is exported as
    ``rocket.jpg`` and ``rocket.png``, not ``rocket.jpg.jpg``). Two ids that would share a
    name (``a.jpg`` and ``a.png`` in one folder) keep them apart with a hash of the id."""

    def __init__(self):
        self.taken: set[str] = set()

    def __call__(self, image_id: str) -> str:
        name = safe_name(image_id)
        stem, dot, extension = name.rpartition(".")
        if dot and "/" not in extension and f".{extension.lower()}" in _KEY_EXTENSIONS:
            name = stem
        if name in self.taken:
            digest = hashlib.sha1(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
            name = f"{name}-{digest}"
        self.taken.add(name)
        return name


_KEY_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
