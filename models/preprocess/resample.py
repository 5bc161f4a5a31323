"""Resampling between an image's own grid and the model's input grid, both ways.

Heatmaps and masks computed on the model grid must land back on the original pixels,
so every forward map has an exact inverse (:class:`SpatialMap`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["Interpolation", "SpatialMap"]

FloatArray = npt.NDArray[np.float32]
Interpolation = Literal["nearest", "linear", "cubic"]


def _kernel(
    kind: Interpolation,
) -> tuple[Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]], float]:
    if kind == "linear":
        return (lambda x: np.clip(1.0 - np.abs(x), 0.0, None)), 1.0
    if kind == "cubic":  # Keys, a = -0.5 (Catmull-Rom)

        def cubic(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            ax = np.abs(x)
            return np.where(
                ax <= 1,
                1.5 * ax**3 - 2.5 * ax**2 + 1,
                np.where(ax < 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0),
            )

        return cubic, 2.0
    raise ValueError(f"unknown interpolation {kind!r}")


@functools.lru_cache(maxsize=64)
def _resample_matrix(n_in: int, n_out: int, kind: Interpolation) -> npt.NDArray[np.float32]:
    """A ``(n_out, n_in)`` matrix resampling a 1-D signal, pixel centres aligned.

    Cached (read-only): a series resamples every slice between the same two grids.

    Output sample *i* sits at input coordinate ``(i + 0.5) * n_in / n_out - 0.5``
    (the ``align_corners=False`` convention).  When shrinking, the kernel is widened
    by the scale factor (anti-aliasing, like PIL), so small bright structures are not
    lost between samples.  Edges are clamped.
    """
    scale = n_in / n_out
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if kind == "nearest":
        idx = np.clip(np.floor(centres + 0.5).astype(np.int64), 0, n_in - 1)
        m[np.arange(n_out), idx] = 1.0
        nearest = m.astype(np.float32)
        nearest.setflags(write=False)
        return nearest
    func, support = _kernel(kind)
    stretch = max(scale, 1.0)
    radius = support * stretch
    for i, c in enumerate(centres):
        lo = math.floor(c - radius)
        hi = math.ceil(c + radius)
        taps = np.arange(lo, hi + 1)
        w = func((taps - c) / stretch)
        total = w.sum()
        if total == 0:
            continue
        w /= total
        np.add.at(m[i], np.clip(taps, 0, n_in - 1), w)
    out = m.astype(np.float32)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class SpatialMap:
    """Resampling between an image's original grid and the model's input grid.

    ``forward`` takes an original ``(..., H, W)`` array to the model size ``(..., h,
    w)``; ``inverse`` takes a model-space map (heatmap, class probabilities) back
    onto the original pixels.  Points map exactly with :meth:`forward_point` /
    :meth:`inverse_point` (pixel-centre convention, so the two are inverse
    functions).  The full field is stretched to the model size (no crop, no pad),
    so every original pixel has a model-space position.
    """

    src_shape: tuple[int, int]
    dst_shape: tuple[int, int]

    def __post_init__(self) -> None:
        for name, shape in (("src_shape", self.src_shape), ("dst_shape", self.dst_shape)):
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"{name} must be two positive ints, got {shape}")

    def _apply(
        self,
        arr: npt.NDArray[np.generic],
        shape_in: tuple[int, int],
        shape_out: tuple[int, int],
        kind: Interpolation,
    ) -> FloatArray:
        a = np.asarray(arr, dtype=np.float32)
        if a.shape[-2:] != shape_in:
            raise ValueError(f"array has spatial shape {a.shape[-2:]}, expected {shape_in}")
        if shape_in == shape_out:
            return a.copy()
        ry = _resample_matrix(shape_in[0], shape_out[0], kind)
        rx = _resample_matrix(shape_in[1], shape_out[1], kind)
        out = np.matmul(np.matmul(ry, a), rx.T)
        return np.asarray(out, dtype=np.float32)

    def forward(self, arr: npt.NDArray[np.generic], kind: Interpolation = "linear") -> FloatArray:
        """Original ``(..., H, W)`` → model ``(..., h, w)``."""
        return self._apply(arr, self.src_shape, self.dst_shape, kind)

    def inverse(self, arr: npt.NDArray[np.generic], kind: Interpolation = "cubic") -> FloatArray:
        """Model-space ``(..., h, w)`` → original ``(..., H, W)``."""
        return self._apply(arr, self.dst_shape, self.src_shape, kind)

    def forward_point(self, row: float, col: float) -> tuple[float, float]:
        """An original pixel position in model-space coordinates."""
        sy = self.dst_shape[0] / self.src_shape[0]
        sx = self.dst_shape[1] / self.src_shape[1]
        return (row + 0.5) * sy - 0.5, (col + 0.5) * sx - 0.5

    def inverse_point(self, row: float, col: float) -> tuple[float, float]:
        """A model-space position in original pixel coordinates."""
        sy = self.src_shape[0] / self.dst_shape[0]
        sx = self.src_shape[1] / self.dst_shape[1]
        return (row + 0.5) * sy - 0.5, (col + 0.5) * sx - 0.5
