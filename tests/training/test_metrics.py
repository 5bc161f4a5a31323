"""Metric code against values computed by hand on small fixed arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import (
    bootstrap_auc_ci,
    cam_peak,
    confusion,
    dice,
    expected_calibration_error,
    iou,
    peak_inside,
    pr_curve,
    roc_auc,
    roc_curve,
)


def test_auc_counts_pairs_and_half_ties() -> None:
    # positives 0.8, 0.4; negatives 0.5, 0.4, 0.1
    # pairs: (0.8>0.5,0.4,0.1)=3, (0.4 vs 0.5)=0, (0.4 vs 0.4)=0.5, (0.4>0.1)=1 -> 4.5 / 6
    y = [1, 0, 1, 0, 0]
    s = [0.8, 0.5, 0.4, 0.4, 0.1]
    assert roc_auc(y, s) == pytest.approx(4.5 / 6)
    assert roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert roc_auc([1, 0], [0.2, 0.9]) == 0.0


def test_auc_needs_both_classes_and_matching_lengths() -> None:
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="3 values"):
        roc_auc([1, 0, 1], [0.1, 0.2])


def test_confusion_matrix_and_rates_by_hand() -> None:
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    s = [0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.5, 0.5]
    r = confusion(y, s, 0.5)  # >= 0.5 is positive
    assert (r.tp, r.fp, r.tn, r.fn) == (3, 2, 2, 1)
    assert r.matrix == [[2, 2], [1, 3]]
    assert r.sensitivity == pytest.approx(3 / 4)
    assert r.specificity == pytest.approx(2 / 4)
    assert r.ppv == pytest.approx(3 / 5)
    assert r.npv == pytest.approx(2 / 3)
    assert r.f1 == pytest.approx(6 / 9)
    assert math.isnan(confusion([0, 0], [0.1, 0.2], 0.5).ppv)


def test_roc_and_pr_curves_end_points() -> None:
    y = [1, 0, 1, 0]
    s = [0.9, 0.8, 0.3, 0.1]
    fpr, tpr, _ = roc_curve(y, s)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    # trapezoid area equals the rank AUC
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(roc_auc(y, s))
    rec, prec, _ = pr_curve(y, s)
    assert rec[0] == 0.5 and prec[0] == 1.0  # top score is a positive
    assert rec[-1] == 1.0 and prec[-1] == 0.5


def test_bootstrap_ci_brackets_the_auc_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0] * 50 + [1] * 50)
    s = np.concatenate([rng.normal(0, 1, 50), rng.normal(1.5, 1, 50)])
    lo, hi = bootstrap_auc_ci(y, s, n_boot=300, seed=1)
    assert lo < roc_auc(y, s) < hi
    assert 0.0 <= lo < hi <= 1.0
    assert (lo, hi) == bootstrap_auc_ci(y, s, n_boot=300, seed=1)


def test_ece_by_hand() -> None:
    # bin [0.1,0.2): p=0.1,0.1 observed 0/2 -> |0-0.1|, weight 2/4
    # bin [0.9,1.0]: p=0.9,0.9 observed 1/2 -> |0.5-0.9|, weight 2/4
    ece = expected_calibration_error([0, 0, 1, 0], [0.1, 0.1, 0.9, 0.9])
    assert ece == pytest.approx(0.5 * 0.1 + 0.5 * 0.4)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == pytest.approx(0.0)


def test_dice_and_iou_by_hand() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :3] = True  # 3 pixels
    b[0, 1:] = True  # 3 pixels, 2 shared
    assert dice(a, b) == pytest.approx(4 / 6)
    assert iou(a, b) == pytest.approx(2 / 4)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.zeros((2, 2)))


def test_cam_peak_maps_cells_to_image_pixels() -> None:
    cam = np.zeros((8, 8))
    cam[2, 5] = 1.0
    # a single hot cell: refined peak is its centre, (2 + 0.5) * 32 - 0.5
    assert cam_peak(cam, (256, 256)) == pytest.approx((79.5, 175.5))
    cam[2, 6] = 1.0  # two equal cells: the refined peak moves towards the second one
    r, c = cam_peak(cam, (256, 256))
    a = math.exp(-1.0)  # softmax weight of a zero cell next to a maximum of 1
    col = (4 * 3 * a + (5 + 6) * (1 + 2 * a)) / (3 * a + 2 * (1 + 2 * a))
    assert r == pytest.approx(79.5) and c == pytest.approx((col + 0.5) * 32 - 0.5)
    assert 175.5 < c < 191.5
    assert cam_peak(cam, (256, 256), refine=False) == pytest.approx((79.5, 175.5))
    mask = np.zeros((256, 256), bool)
    mask[70:90, 176:190] = True
    assert peak_inside((r, c), mask)
    assert not peak_inside((10.0, 10.0), mask)
