"""Series geometry: slice order along the normal, pixel and slice spacing (PS3.3 C.7.6.2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from models.preprocess._values import first_float

__all__ = ["pixel_spacing", "slice_spacing", "sort_series"]


def _normal(ds: Dataset) -> npt.NDArray[np.float64] | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 0 else None


def _position(ds: Dataset, normal: npt.NDArray[np.float64] | None) -> float | None:
    ipp = ds.get("ImagePositionPatient")
    if normal is None or ipp is None or len(ipp) != 3:
        return None
    return float(np.dot(np.asarray(ipp, dtype=float), normal))


def sort_series(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Order a series along the slice normal, falling back to InstanceNumber.

    The normal comes from the first image's ImageOrientationPatient; positions are
    ImagePositionPatient projected on it (PS3.3 C.7.6.2.1.1).  If any image lacks
    geometry, InstanceNumber (then SOP Instance UID) orders the series instead.
    """
    items = list(datasets)
    if not items:
        return []
    normal = _normal(items[0])
    positions = [_position(ds, normal) for ds in items]
    if all(p is not None for p in positions):
        order = sorted(range(len(items)), key=lambda i: (positions[i], _instance_number(items[i])))
    else:
        order = sorted(
            range(len(items)),
            key=lambda i: (_instance_number(items[i]), str(items[i].get("SOPInstanceUID", ""))),
        )
    return [items[i] for i in order]


def _instance_number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm: PixelSpacing, else ImagerPixelSpacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                row, col = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return row, col
    return None


def slice_spacing(sorted_datasets: Sequence[Dataset]) -> float | None:
    """Distance in mm between consecutive slices of a sorted series.

    The median gap of positions along the normal; for a single image
    SpacingBetweenSlices or SliceThickness; None when nothing says.
    """
    if len(sorted_datasets) > 1:
        normal = _normal(sorted_datasets[0])
        positions = [_position(ds, normal) for ds in sorted_datasets]
        if all(p is not None for p in positions):
            gaps = np.abs(np.diff(np.asarray(positions, dtype=float)))
            gaps = gaps[gaps > 1e-6]
            if gaps.size:
                return float(np.median(gaps))
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = first_float(sorted_datasets[0].get(keyword)) if sorted_datasets else None
        if value is not None and value > 0:
            return value
    return None
