"""Where a class activation map points: shared by the serving pipeline and evaluation.

The node reports this point in the SR (``Finding.peak``) and evaluation measures how
often it lands inside the lesion, so both must compute it the same way.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["cam_peak"]


def cam_peak(
    cam: ArrayLike, image_shape: tuple[int, int], *, refine: bool = True
) -> tuple[float, float]:
    """Where a coarse class activation map peaks, in image pixel coordinates (row, col).

    Each CAM cell covers ``image/cam`` pixels (32 for a ResNet); its centre is at
    ``(i + 0.5) * stride - 0.5``.  With ``refine`` the peak is the centroid of the 3x3
    cells around the maximum, weighted by their spatial softmax ``exp(cam - max)``
    (the distribution the CAM localisation loss trains), a sub-cell peak estimate;
    otherwise the centre of the maximum cell.
    """
    c = np.asarray(cam, dtype=np.float64)
    if c.ndim != 2 or c.size == 0:
        raise ValueError(f"cam must be a non-empty 2D array, got shape {c.shape}")
    h, w = c.shape
    sy, sx = image_shape[0] / h, image_shape[1] / w
    i, j = np.unravel_index(int(np.argmax(c)), c.shape)
    ci, cj = float(i), float(j)
    if refine:
        i0, i1, j0, j1 = max(i - 1, 0), min(i + 2, h), max(j - 1, 0), min(j + 2, w)
        win = c[i0:i1, j0:j1]
        wgt = np.exp(win - win.max())
        if wgt.sum() > 0:
            ii, jj = np.mgrid[i0:i1, j0:j1]
            ci = float((wgt * ii).sum() / wgt.sum())
            cj = float((wgt * jj).sum() / wgt.sum())
    return (ci + 0.5) * sy - 0.5, (cj + 0.5) * sx - 0.5
