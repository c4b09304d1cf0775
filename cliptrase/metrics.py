"""Semantic-segmentation metrics from a confusion matrix, as mmsegmentation computes them.

mmseg's ``intersect_and_union`` drops pixels whose ground truth is the ignore index, then counts
per class the intersection, the predicted area and the GT area; ``total_area_to_metrics`` gives
``aAcc = sum(intersect) / sum(area_gt)``, ``IoU = intersect / union``, ``Acc = intersect / area_gt``
and the benchmark numbers are their ``nanmean`` over classes. So:

* a class absent from both GT and prediction has IoU NaN and is left out of mIoU;
* a class predicted but absent from GT has IoU 0 (it counts) and Acc NaN (it does not);
* a predicted label outside ``[0, num_classes)`` is never correct: it adds to its pixel's GT
  area but to no class's predicted area (mmseg's histogram drops it the same way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class ConfusionMatrix:
    """``matrix[g, p]``: pixels of GT class ``g`` predicted as ``p``; accumulate with :meth:`update`."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} is a class index (num_classes={num_classes})"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        # Per GT class: pixels predicted as a label outside [0, num_classes).
        self.out_of_range = np.zeros(num_classes, dtype=np.int64)
        self.images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> ConfusionMatrix:
        """Add one image (or any batch of pixels): ``pred`` and ``gt`` integer arrays, same shape."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from GT shape {gt.shape}")
        for what, a in (("prediction", pred), ("GT", gt)):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
                raise ValueError(f"{what} must hold integer labels, got dtype {a.dtype}")
        gt = gt.astype(np.int64).ravel()
        pred = pred.astype(np.int64).ravel()
        if self.ignore_index is not None:
            keep = gt != self.ignore_index
            gt, pred = gt[keep], pred[keep]
        n = self.num_classes
        bad_gt = (gt < 0) | (gt >= n)
        if bad_gt.any():
            raise ValueError(
                f"GT holds labels {sorted(set(np.unique(gt[bad_gt]).tolist()))[:10]} outside "
                f"[0, {n}) that are not the ignore index {self.ignore_index}"
            )
        valid = (pred >= 0) & (pred < n)
        self.matrix += np.bincount(gt[valid] * n + pred[valid], minlength=n * n).reshape(n, n)
        self.out_of_range += np.bincount(gt[~valid], minlength=n)
        self.images += 1
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (e.g. from another worker) into this one."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError("cannot merge confusion matrices of different classes/ignore index")
        self.matrix += other.matrix
        self.out_of_range += other.out_of_range
        self.images += other.images
        return self

    # ------------------------------------------------------------------ areas
    @property
    def area_intersect(self) -> np.ndarray:
        return np.diag(self.matrix).copy()

    @property
    def area_gt(self) -> np.ndarray:
        return self.matrix.sum(axis=1) + self.out_of_range

    @property
    def area_pred(self) -> np.ndarray:
        return self.matrix.sum(axis=0)

    @property
    def area_union(self) -> np.ndarray:
        return self.area_pred + self.area_gt - self.area_intersect

    # ---------------------------------------------------------------- metrics
    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN where the class is in neither GT nor prediction."""
        return _ratio(self.area_intersect, self.area_union)

    def accuracy(self) -> np.ndarray:
        """Per-class accuracy (recall); NaN where the class is absent from the GT."""
        return _ratio(self.area_intersect, self.area_gt)

    def miou(self) -> float:
        return _nanmean(self.iou())

    def mean_accuracy(self) -> float:
        """mAcc."""
        return _nanmean(self.accuracy())

    def pixel_accuracy(self) -> float:
        """aAcc: correct pixels over all non-ignored GT pixels."""
        total = int(self.area_gt.sum())
        return float(self.area_intersect.sum() / total) if total else math.nan

    def summary(self) -> dict[str, float | int]:
        """``mIoU``, ``aAcc``, ``mAcc`` as fractions, and the pixel/image counts."""
        return {
            "mIoU": self.miou(),
            "aAcc": self.pixel_accuracy(),
            "mAcc": self.mean_accuracy(),
            "pixels": int(self.area_gt.sum()),
            "images": self.images,
        }

    def per_class(self, names: Sequence[str] | None = None) -> list[dict]:
        """One row per class: name, IoU, Acc, GT pixels, predicted pixels."""
        names = list(names) if names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} names for {self.num_classes} classes")
        return [
            {
                "index": i,
                "name": names[i],
                "iou": float(iou),
                "acc": float(acc),
                "gt_pixels": int(gt),
                "pred_pixels": int(pred),
            }
            for i, (iou, acc, gt, pred) in enumerate(
                zip(self.iou(), self.accuracy(), self.area_gt, self.area_pred)
            )
        ]

    def markdown(self, names: Sequence[str] | None = None) -> str:
        """Summary line and per-class table in percent, NaN shown as ``-``."""
        s = self.summary()
        lines = [
            "| mIoU | aAcc | mAcc | images | pixels |",
            "|---:|---:|---:|---:|---:|",
            f"| {_pct(s['mIoU'])} | {_pct(s['aAcc'])} | {_pct(s['mAcc'])} "
            f"| {s['images']} | {s['pixels']} |",
            "",
            "| # | class | IoU | Acc | GT pixels | predicted pixels |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for row in self.per_class(names):
            lines.append(
                f"| {row['index']} | {row['name']} | {_pct(row['iou'])} | {_pct(row['acc'])} "
                f"| {row['gt_pixels']} | {row['pred_pixels']} |"
            )
        return "\n".join(lines) + "\n"


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}"
