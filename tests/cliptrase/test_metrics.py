"""ConfusionMatrix against hand-computed matrices and mmsegmentation's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cliptrase.metrics import ConfusionMatrix


def test_confusion_matrix_counts_gt_rows_and_prediction_columns_and_skips_ignore():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    cm = ConfusionMatrix(3).update(pred, gt)
    # gt 0 -> pred 0, 1; gt 1 -> pred 1, 1; gt 2 -> pred 0; the 255 pixel is dropped.
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert cm.area_gt.tolist() == [2, 2, 1]
    assert cm.area_pred.tolist() == [2, 3, 0]
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 0.0])
    np.testing.assert_allclose(cm.accuracy(), [1 / 2, 1.0, 0.0])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert cm.mean_accuracy() == pytest.approx(0.5)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_class_absent_from_gt_and_prediction_is_nan_and_left_out_of_means():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    cm = ConfusionMatrix(4).update(pred, gt)
    iou = cm.iou()
    assert math.isnan(iou[2]) and math.isnan(iou[3])
    assert cm.miou() == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert cm.mean_accuracy() == pytest.approx((1 + 0.5) / 2)


def test_class_predicted_but_absent_from_gt_counts_zero_iou_and_nan_accuracy():
    gt = np.array([0, 0, 0, 0])
    pred = np.array([0, 0, 0, 1])
    cm = ConfusionMatrix(2).update(pred, gt)
    assert cm.iou().tolist() == [0.75, 0.0]
    assert cm.miou() == pytest.approx(0.375)  # class 1 counts in mIoU (as mmseg)
    acc = cm.accuracy()
    assert acc[0] == 0.75 and math.isnan(acc[1])
    assert cm.mean_accuracy() == 0.75


def test_out_of_range_predictions_are_errors_of_their_gt_class():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 7, 1, -1])
    cm = ConfusionMatrix(2).update(pred, gt)
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    assert cm.out_of_range.tolist() == [1, 1]
    assert cm.iou().tolist() == [0.5, 0.5]
    assert cm.pixel_accuracy() == 0.5


def test_metrics_equal_the_mmseg_formulas_on_random_labels():
    rng = np.random.default_rng(0)
    n = 6
    cm = ConfusionMatrix(n)
    images = []
    for _ in range(3):
        gt = rng.integers(0, n, size=(17, 23))
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, n + 2, size=gt.shape))
        pred[gt == 255] = rng.integers(0, n, size=(gt == 255).sum())
        cm.update(pred, gt)
        images.append((pred, gt))
    # mmseg intersect_and_union, summed over images, written out directly.
    inter = np.zeros(n)
    area_pred = np.zeros(n)
    area_gt = np.zeros(n)
    for pred, gt in images:
        keep = gt != 255
        p, g = pred[keep], gt[keep]
        hit = p[p == g]
        inter += np.histogram(hit, bins=n, range=(0, n - 1))[0]
        area_pred += np.histogram(p, bins=n, range=(0, n - 1))[0]
        area_gt += np.histogram(g, bins=n, range=(0, n - 1))[0]
    union = area_pred + area_gt - inter
    np.testing.assert_allclose(cm.iou(), inter / union)
    np.testing.assert_allclose(cm.accuracy(), inter / area_gt)
    assert cm.pixel_accuracy() == pytest.approx(inter.sum() / area_gt.sum())
    assert cm.miou() == pytest.approx(np.nanmean(inter / union))


def test_merge_equals_one_matrix_over_all_images():
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(0, 3, (5, 5)), rng.integers(0, 3, (5, 5))) for _ in range(4)]
    whole = ConfusionMatrix(3)
    left, right = ConfusionMatrix(3), ConfusionMatrix(3)
    for i, (p, g) in enumerate(pairs):
        whole.update(p, g)
        (left if i % 2 else right).update(p, g)
    merged = left.merge(right)
    assert (merged.matrix == whole.matrix).all() and merged.images == 4


def test_bad_input_is_refused_with_a_reason():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.zeros(2, int), np.array([0, 5]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.zeros(2), np.zeros(2, int))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(300, ignore_index=255)


def test_per_class_table_and_markdown_show_nan_as_dash():
    cm = ConfusionMatrix(3).update(np.array([0, 1]), np.array([0, 1]))
    rows = cm.per_class(["a", "b", "c"])
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["iou"] == 1.0 and math.isnan(rows[2]["iou"])
    table = cm.markdown(["a", "b", "c"])
    assert "| 2 | c | - | - | 0 | 0 |" in table
    assert "| 100.00 | 100.00 | 100.00 | 1 | 2 |" in table
