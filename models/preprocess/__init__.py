"""Pixel preprocessing shared by training and serving (pure numpy, no torch).

One package so that the two never drift apart, split by concern:

* :mod:`models.preprocess.decode` — stored pixels of every transfer syntax the
  receiver accepts (:func:`decode_frames`);
* :mod:`models.preprocess.greylevels` — modality LUT (PS3.3 C.11.1), VOI from the
  manifest, the header, BitsStored or robust percentiles (C.11.2), MONOCHROME1
  inversion (C.7.6.3.1.2), normalisation and channel layout;
* :mod:`models.preprocess.resample` — the model grid and back (:class:`SpatialMap`),
  so heatmaps and masks land on the original pixels;
* :mod:`models.preprocess.geometry` — slice order along the normal
  (PS3.3 C.7.6.2.1.1) and pixel / slice spacing.

:func:`preprocess_frame` chains them for one frame.  Every name importable from
``models.preprocess`` before the split still is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from models.preprocess.decode import MAX_DECODED_BYTES, PixelDecodeError, decode_frames
from models.preprocess.geometry import pixel_spacing, slice_spacing, sort_series
from models.preprocess.greylevels import (
    GREY_SOURCES,
    GreySource,
    apply_window,
    bits_window,
    image_to_unit,
    modality_lut,
    normalise,
    percentile_window,
    to_channels,
    voi_to_unit,
    window_from_dataset,
)
from models.preprocess.resample import Interpolation, SpatialMap

__all__ = [
    "GREY_SOURCES",
    "MAX_DECODED_BYTES",
    "GreySource",
    "Interpolation",
    "PixelDecodeError",
    "SpatialMap",
    "apply_window",
    "bits_window",
    "decode_frames",
    "image_to_unit",
    "modality_lut",
    "normalise",
    "percentile_window",
    "pixel_spacing",
    "preprocess_frame",
    "slice_spacing",
    "sort_series",
    "to_channels",
    "voi_to_unit",
    "window_from_dataset",
]


FloatArray = npt.NDArray[np.float32]


def preprocess_frame(
    frame: npt.NDArray[np.generic],
    ds: Dataset,
    size: tuple[int, int],
    channels: int = 1,
    window: tuple[float, float] | None = None,
    use_dataset_window: bool = True,
    mean: Sequence[float] | float = 0.0,
    std: Sequence[float] | float = 1.0,
    *,
    sources: Sequence[GreySource] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> tuple[FloatArray, SpatialMap]:
    """One decoded frame → model input ``(channels, h, w)`` float32, plus its map.

    ``sources`` and ``percentiles`` are the manifest's grey-level declaration
    (:func:`models.preprocess.greylevels.image_to_unit`).
    """
    unit = image_to_unit(
        frame, ds, window, use_dataset_window, sources=sources, percentiles=percentiles
    )
    smap = SpatialMap((int(unit.shape[0]), int(unit.shape[1])), (int(size[0]), int(size[1])))
    chw = to_channels(unit, channels)
    resized = smap.forward(chw, "linear")
    return normalise(resized, mean, std), smap
