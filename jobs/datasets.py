"""Where the images and ground-truth masks of an evaluation set live, read through fsspec.

A layout turns a root URI (local folder, ``s3://bucket/prefix``, ...) into :class:`Sample`
pairs of image and GT-mask URIs, knows the class-list preset of its benchmark, and maps raw GT
values to the label order of that class list (classes first, background last, 255 ignored),
the order the segmentor predicts in. The layouts follow mmsegmentation's dataset preparation.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import numpy as np
from PIL import Image

from cliptrase.classfile import ClassList

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset root is missing, empty or not in the layout asked for."""


@dataclass(frozen=True)
class Sample:
    """One image and its GT mask; ``key`` names the prediction file (``<key>.png``)."""

    key: str
    image_uri: str
    gt_uri: str


# ---------------------------------------------------------------- GT encodings
def identity_gt(raw: np.ndarray, num_labels: int) -> np.ndarray:
    return raw


def reduce_zero_label(raw: np.ndarray, num_labels: int) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 (unlabelled / background) is ignored, k becomes k-1."""
    out = raw.astype(np.int64) - 1
    out[(raw == 0) | (raw == IGNORE_INDEX)] = IGNORE_INDEX
    return out


def background_first_to_last(raw: np.ndarray, num_labels: int) -> np.ndarray:
    """GT with background 0 and classes 1..C (VOC21, Context60, COCO-Object) to the segmentor's
    order, classes 0..C-1 and background C."""
    out = raw.astype(np.int64) - 1
    out[raw == 0] = num_labels - 1
    out[raw == IGNORE_INDEX] = IGNORE_INDEX
    return out


GtMap = Callable[[np.ndarray, int], np.ndarray]


# --------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class DatasetLayout:
    """A benchmark's files: either a split list (VOC style) or paired image/GT folders."""

    name: str
    description: str
    preset: str | None
    gt_map: GtMap = field(default=identity_gt, repr=False)
    image_dir: str = "images"
    gt_dir: str = "masks"
    image_suffixes: tuple[str, ...] = IMAGE_SUFFIXES  # the file name's ending after the key
    gt_suffix: str = ".png"
    split_file: str | None = None  # one key per line; images are <image_dir>/<key>.jpg

    def class_list(self, family: str = "clip") -> ClassList | None:
        """The benchmark's class list as ``family``'s papers prompt it."""
        return ClassList.from_preset(self.preset, family) if self.preset else None

    def samples(self, root: str, storage_options: dict | None = None) -> list[Sample]:
        """Every (image, GT) pair under ``root``, sorted by key."""
        fs, base = _filesystem(root, storage_options)
        if not fs.exists(base):
            raise DatasetError(f"dataset root {root} does not exist")
        if self.split_file is not None:
            return self._from_split_file(fs, base)
        return self._from_folders(fs, base, root)

    def _from_split_file(self, fs, base: str) -> list[Sample]:
        split = posixpath.join(base, self.split_file)
        if not fs.exists(split):
            raise DatasetError(f"{self.name}: split file {fs.unstrip_protocol(split)} not found")
        keys = [k.strip() for k in fs.cat_file(split).decode().splitlines() if k.strip()]
        if not keys:
            raise DatasetError(f"{self.name}: split file {split} lists no images")
        return [
            Sample(
                key,
                fs.unstrip_protocol(
                    posixpath.join(base, self.image_dir, key + self.image_suffixes[0])
                ),
                fs.unstrip_protocol(posixpath.join(base, self.gt_dir, key + self.gt_suffix)),
            )
            for key in keys
        ]

    def _from_folders(self, fs, base: str, root: str) -> list[Sample]:
        images = _index(fs, posixpath.join(base, self.image_dir), self.image_suffixes)
        masks = _index(fs, posixpath.join(base, self.gt_dir), (self.gt_suffix,))
        if not images:
            raise DatasetError(
                f"{self.name}: no images ({', '.join(self.image_suffixes)}) under "
                f"{root.rstrip('/')}/{self.image_dir}"
            )
        missing = sorted(set(images) - set(masks))
        if missing:
            raise DatasetError(
                f"{self.name}: {len(missing)} of {len(images)} images have no GT mask "
                f"{self.gt_dir}/<key>{self.gt_suffix}, e.g. {missing[:3]}"
            )
        return [
            Sample(key, fs.unstrip_protocol(images[key]), fs.unstrip_protocol(masks[key]))
            for key in sorted(images)
        ]


def _filesystem(root: str, storage_options: dict | None):
    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    return fs, base.rstrip("/")


def _index(fs, folder: str, suffixes: tuple[str, ...]) -> dict[str, str]:
    """``{key: path}`` of files under ``folder`` ending in one of ``suffixes`` (recursively);
    the key is the path relative to ``folder`` without the suffix."""
    if not fs.exists(folder):
        return {}
    out: dict[str, str] = {}
    for path in fs.find(folder):
        rel = posixpath.relpath(path, folder)
        suffix = next((s for s in suffixes if rel.lower().endswith(s.lower())), None)
        if suffix is None:
            continue
        key = rel[: -len(suffix)]
        if key in out:
            raise DatasetError(f"two files for {key!r} under {folder}: {out[key]} and {path}")
        out[key] = path
    return out


_VOC = dict(
    image_dir="JPEGImages",
    gt_dir="SegmentationClass",
    image_suffixes=(".jpg",),
    split_file="ImageSets/Segmentation/val.txt",
)
_CONTEXT = dict(
    image_dir="JPEGImages",
    gt_dir="SegmentationClassContext",
    image_suffixes=(".jpg",),
    split_file="ImageSets/SegmentationContext/val.txt",
)
_COCO = dict(image_dir="images/val2017", gt_dir="annotations/val2017", image_suffixes=(".jpg",))

DATASETS: dict[str, DatasetLayout] = {
    layout.name: layout
    for layout in (
        DatasetLayout(
            "generic",
            "ROOT/images/<key>.<jpg|png|...> and ROOT/masks/<key>.png, mask values = label ids",
            None,
        ),
        DatasetLayout(
            "voc21",
            "Pascal VOC 2012 val with background (ROOT = VOCdevkit/VOC2012)",
            "voc21",
            background_first_to_last,
            **_VOC,
        ),
        DatasetLayout(
            "voc20",
            "Pascal VOC 2012 val without background (ROOT = VOCdevkit/VOC2012)",
            "voc20",
            reduce_zero_label,
            **_VOC,
        ),
        DatasetLayout(
            "context60",
            "Pascal Context val, 59 classes + background (ROOT = VOCdevkit/VOC2010)",
            "context60",
            background_first_to_last,
            **_CONTEXT,
        ),
        DatasetLayout(
            "context59",
            "Pascal Context val, 59 classes (ROOT = VOCdevkit/VOC2010)",
            "context59",
            reduce_zero_label,
            **_CONTEXT,
        ),
        DatasetLayout(
            "coco_object",
            "COCO-Object val2017, 80 classes + background (ROOT = coco_stuff164k, "
            "*_instanceTrainIds.png)",
            "coco_object",
            background_first_to_last,
            gt_suffix="_instanceTrainIds.png",
            **_COCO,
        ),
        DatasetLayout(
            "coco_stuff",
            "COCO-Stuff 164k val2017, 171 classes (ROOT = coco_stuff164k, *_labelTrainIds.png)",
            "coco_stuff171",
            gt_suffix="_labelTrainIds.png",
            **_COCO,
        ),
        DatasetLayout(
            "ade20k",
            "ADE20K val, 150 classes (ROOT = ADEChallengeData2016)",
            "ade20k",
            reduce_zero_label,
            image_dir="images/validation",
            gt_dir="annotations/validation",
            image_suffixes=(".jpg",),
        ),
        DatasetLayout(
            "cityscapes",
            "Cityscapes val, 19 classes (ROOT = cityscapes, *_gtFine_labelTrainIds.png)",
            "cityscapes",
            image_dir="leftImg8bit/val",
            gt_dir="gtFine/val",
            image_suffixes=("_leftImg8bit.png",),
            gt_suffix="_gtFine_labelTrainIds.png",
        ),
    )
}
ALIASES = {"voc": "voc21", "coco_stuff171": "coco_stuff", "city_scapes": "cityscapes"}


def get_layout(name: str) -> DatasetLayout:
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ---------------------------------------------------------------------- reading
def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        return f.read()


def read_label_png(uri: str, storage_options: dict | None = None) -> np.ndarray:
    """A single-channel label PNG (palette, 8- or 16-bit grey) as an integer ``(H, W)`` array."""
    with Image.open(io.BytesIO(read_bytes(uri, storage_options))) as img:
        if img.mode not in ("P", "L", "I", "I;16", "I;16B", "1"):
            raise DatasetError(
                f"{uri}: a label mask must be a single-channel PNG (palette or grey), "
                f"got mode {img.mode}"
            )
        labels = np.array(img)
    return labels.astype(np.int64) if labels.dtype.kind in "bi" else labels


def read_rgb(uri: str, storage_options: dict | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(read_bytes(uri, storage_options))) as img:
        return np.asarray(img.convert("RGB"))


def read_gt(
    layout: DatasetLayout, sample: Sample, num_labels: int, storage_options: dict | None = None
) -> np.ndarray:
    """The GT of ``sample`` in the class list's label order (255 = ignore)."""
    return layout.gt_map(read_label_png(sample.gt_uri, storage_options), num_labels)
