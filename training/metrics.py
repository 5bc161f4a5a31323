"""Evaluation metrics in plain numpy, each small enough to check by hand.

Classification: ROC AUC (Mann-Whitney U, ties counted one half), a bootstrap
percentile 95% confidence interval, the confusion matrix and the rates derived from it
at the operating threshold, expected calibration error.  Segmentation: Dice and IoU.
Localisation: whether a class activation map's peak falls inside the lesion mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.cam import cam_peak

__all__ = [
    "BinaryReport",
    "bootstrap_auc_ci",
    "cam_peak",
    "confusion",
    "dice",
    "expected_calibration_error",
    "iou",
    "pr_curve",
    "reliability",
    "roc_auc",
    "roc_curve",
]

ArrayLike = npt.ArrayLike
FArray = npt.NDArray[np.float64]


def _binary(y_true: ArrayLike, scores: ArrayLike) -> tuple[npt.NDArray[np.int64], FArray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} values but scores has {s.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    return y, s


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + ties / 2."""
    y, s = _binary(y_true, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative case")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def bootstrap_auc_ci(
    y_true: ArrayLike, scores: ArrayLike, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC, resampling positives and negatives separately.

    Stratified resampling keeps both classes in every replicate (Carpenter & Bithell 2000).
    """
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y, s = _binary(y_true, scores)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUC needs at least one positive and one negative case")
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_boot)
    for b in range(n_boot):
        p = pos[rng.integers(0, pos.size, pos.size)]
        n = neg[rng.integers(0, neg.size, neg.size)]
        # vectorised Mann-Whitney for the replicate
        diff = p[:, None] - n[None, :]
        aucs[b] = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (p.size * n.size)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(aucs, [alpha, 1 - alpha])
    return float(lo), float(hi)


def roc_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[FArray, FArray, FArray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending."""
    y, s = _binary(y_true, scores)
    thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
    tpr = np.array([((s >= t) & (y == 1)).sum() for t in thresholds]) / max(int(y.sum()), 1)
    fpr = np.array([((s >= t) & (y == 0)).sum() for t in thresholds]) / max(int((1 - y).sum()), 1)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def pr_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[FArray, FArray, FArray]:
    """(recall, precision, thresholds), thresholds descending; precision of an empty set is 1."""
    y, s = _binary(y_true, scores)
    thresholds = np.unique(s)[::-1]
    tp = np.array([((s >= t) & (y == 1)).sum() for t in thresholds], dtype=np.float64)
    fp = np.array([((s >= t) & (y == 0)).sum() for t in thresholds], dtype=np.float64)
    recall = tp / max(int(y.sum()), 1)
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    return recall, precision, thresholds


@dataclass(frozen=True)
class BinaryReport:
    """Counts and rates at one threshold (a score >= threshold is called positive)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @staticmethod
    def _ratio(num: int, den: int) -> float:
        return float(num / den) if den else float("nan")

    @property
    def sensitivity(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return self._ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        return self._ratio(self.tn, self.tn + self.fn)

    @property
    def accuracy(self) -> float:
        return self._ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn)

    @property
    def f1(self) -> float:
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def matrix(self) -> list[list[int]]:
        """Rows: true class (0, 1); columns: predicted class (0, 1)."""
        return [[self.tn, self.fp], [self.fn, self.tp]]

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)
        for name in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1"):
            d[name] = getattr(self, name)
        d["confusion_matrix"] = self.matrix
        return d


def confusion(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> BinaryReport:
    """Confusion counts at ``threshold``."""
    y, s = _binary(y_true, scores)
    pred = s >= threshold
    return BinaryReport(
        threshold=float(threshold),
        tp=int((pred & (y == 1)).sum()),
        fp=int((pred & (y == 0)).sum()),
        tn=int((~pred & (y == 0)).sum()),
        fn=int((~pred & (y == 1)).sum()),
    )


def reliability(
    y_true: ArrayLike, probs: ArrayLike, n_bins: int = 10
) -> tuple[FArray, FArray, npt.NDArray[np.int64]]:
    """Per equal-width bin: mean predicted probability, observed frequency, count."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _binary(y_true, probs)
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(counts > 0, sum_p / np.maximum(counts, 1), np.nan)
        freq = np.where(counts > 0, sum_y / np.maximum(counts, 1), np.nan)
    return conf, freq, counts


def expected_calibration_error(y_true: ArrayLike, probs: ArrayLike, n_bins: int = 10) -> float:
    """ECE = sum over bins of (bin share) * |observed frequency - mean probability|."""
    conf, freq, counts = reliability(y_true, probs, n_bins)
    total = counts.sum()
    used = counts > 0
    return float((counts[used] / total * np.abs(freq[used] - conf[used])).sum())


def dice(pred: ArrayLike, truth: ArrayLike) -> float:
    """Dice = 2|A∩B| / (|A|+|B|); two empty masks agree perfectly (1.0)."""
    a, b = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    den = int(a.sum()) + int(b.sum())
    return 1.0 if den == 0 else float(2 * int((a & b).sum()) / den)


def iou(pred: ArrayLike, truth: ArrayLike) -> float:
    """Jaccard index |A∩B| / |A∪B|; two empty masks agree perfectly (1.0)."""
    a, b = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = int((a | b).sum())
    return 1.0 if union == 0 else float(int((a & b).sum()) / union)


def peak_inside(peak: tuple[float, float], mask: ArrayLike) -> bool:
    """Whether the pixel nearest to ``peak`` lies inside ``mask``."""
    m = np.asarray(mask).astype(bool)
    r = min(max(round(peak[0]), 0), m.shape[0] - 1)
    c = min(max(round(peak[1]), 0), m.shape[1] - 1)
    return bool(m[r, c])
