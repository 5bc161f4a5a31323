"""An out-of-distribution score: how far a series' model inputs are from the training set's.

The input guards (:mod:`models.guards`) refuse what the headers say is wrong.  An
image can pass them and still look nothing like what the model learned from (another
detector, a processing the training never saw, a body part with no header).  This
score compares cheap statistics of the *model input* (after the grey-level steps and
resampling, so it measures what the net actually sees) with the same statistics over
the training set, stored in the package manifest (``[input.reference]``):

* mean, standard deviation, 5th/50th/95th percentile of the normalised input;
* mean absolute gradient along rows and along columns (sharpness, noise);
* share of pixels at the input's minimum and at its maximum (clipping, saturation).

The score is the root mean square of the features' z-scores against the training
mean and standard deviation; a series scores the median over its images.
``InferenceResult.ood_score`` carries it, and ``out_of_domain`` is set when it
exceeds the reference's threshold (a high percentile of the training images' own
scores), so the encoders can flag such results.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["FEATURES", "input_features", "ood_score", "reference_from"]

FEATURES = (
    "mean",
    "std",
    "p5",
    "p50",
    "p95",
    "grad_rows",
    "grad_cols",
    "at_min",
    "at_max",
)


def input_features(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """The statistics of one model input ``(C, H, W)`` (channel 0), in :data:`FEATURES` order."""
    img = np.asarray(x[0] if x.ndim == 3 else x, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    p5, p50, p95 = np.percentile(img[::2, ::2], [5, 50, 95])
    eps = 1e-3 * max(hi - lo, 1e-6)
    return np.array(
        [
            img.mean(),
            img.std(),
            p5,
            p50,
            p95,
            np.abs(np.diff(img, axis=0)).mean(),
            np.abs(np.diff(img, axis=1)).mean(),
            (img <= lo + eps).mean(),
            (img >= hi - eps).mean(),
        ]
    )


def ood_score(
    features: npt.NDArray[np.float64] | Sequence[npt.NDArray[np.float64]],
    mean: Sequence[float],
    std: Sequence[float],
) -> float:
    """RMS z-score of the features; for several images, the median of their scores."""
    f = np.atleast_2d(np.asarray(features, dtype=np.float64))
    z = (f - np.asarray(mean)) / np.maximum(np.asarray(std), 1e-6)
    return float(np.median(np.sqrt(np.mean(z**2, axis=1))))


def reference_from(
    inputs: npt.NDArray[np.float32], quantile: float = 0.995
) -> dict[str, list[float] | float]:
    """Training-set reference: feature mean and std, and the threshold on the score
    (the ``quantile`` of the training inputs' own scores, times 1.25 for margin)."""
    feats = np.stack([input_features(x) for x in inputs])
    # a floor on the spread: a feature constant over the training inputs (e.g. the 5th
    # percentile at the window floor) must not turn any small deviation into an alarm
    mean, std = feats.mean(axis=0), np.maximum(feats.std(axis=0), 0.01)
    scores = [ood_score(f, mean, std) for f in feats]
    return {
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "threshold": float(np.quantile(scores, quantile) * 1.25),
    }
