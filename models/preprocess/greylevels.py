"""Grey levels: stored values → modality values → VOI → [0, 1], bright = dense.

The steps follow the grayscale pipeline of PS3.3 C.11:

1. **Modality LUT** or Rescale Slope/Intercept (C.11.1): :func:`modality_lut`.  CT
   becomes Hounsfield units; projection radiographs stay in arbitrary detector units.
2. **VOI**: the values of interest mapped onto [0, 1].  Where the window comes from
   is a property of the *model* (its manifest says which sources it accepts, in
   order; the first that applies wins, :func:`voi_to_unit`):

   * ``manifest`` — a fixed window in modality units.  Right for CT, whose units
     (HU) mean the same on every scanner.
   * ``header`` — the data set's own VOI window (WindowCenter/Width with its VOI LUT
     Function, C.11.2.1.2) or VOI LUT Sequence (C.11.2.1.1), where present.
   * ``bits`` — the whole range BitsStored can hold (signed or not), through the
     modality LUT.
   * ``percentile`` — robust per-image percentiles of the modality values.  Projection
     radiographs carry no calibrated unit: the same exposure is stored at 8 to 16
     bits, with any gain.  Percentiles make the input invariant to bit depth, gain and
     offset, which a fixed window (e.g. C2048/W4096) is not.
   * ``minmax`` — the image's own range (last resort).

3. **MONOCHROME1** inversion (C.7.6.3.1.2), so that bright always means dense.

Training and serving both call :func:`image_to_unit` (through
``models.preprocess.preprocess_frame``), so the two never drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from models.preprocess._values import first_float

__all__ = [
    "GREY_SOURCES",
    "GreySource",
    "apply_window",
    "bits_window",
    "image_to_unit",
    "modality_lut",
    "normalise",
    "percentile_window",
    "to_channels",
    "voi_to_unit",
    "window_from_dataset",
]

FloatArray = npt.NDArray[np.float32]
GreySource = Literal["manifest", "header", "bits", "percentile", "minmax"]
GREY_SOURCES: tuple[GreySource, ...] = ("manifest", "header", "bits", "percentile", "minmax")

#: At most this many pixels feed the percentile estimate (a regular subsample), so a
#: 3000 x 3000 radiograph costs the same as a 1000 x 1000 one.
_PERCENTILE_SAMPLES = 1 << 20


def modality_lut(frame: npt.NDArray[np.generic], ds: Dataset) -> FloatArray:
    """Apply the Modality LUT or Rescale Slope/Intercept (PS3.3 C.11.1), as float32.

    CT becomes Hounsfield units.  Colour images pass through unchanged.
    """
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
        return np.asarray(frame, dtype=np.float32)
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)
    slope, intercept = _rescale(ds)
    out = np.asarray(frame, dtype=np.float32)
    if slope != 1.0:
        out = out * np.float32(slope)
    if intercept != 0.0:
        out = out + np.float32(intercept)
    return out


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def window_from_dataset(ds: Dataset) -> tuple[float, float] | None:
    """The first VOI window (center, width) stored in the data set, or None."""
    center = first_float(ds.get("WindowCenter"))
    width = first_float(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return center, width


def bits_window(ds: Dataset) -> tuple[float, float] | None:
    """The window spanning every value BitsStored can hold, in modality units.

    Unsigned ``n`` bits hold 0..2**n - 1, signed (PixelRepresentation 1)
    -2**(n-1)..2**(n-1) - 1 (PS3.3 C.7.6.3.1); both ends go through the rescale.
    None without BitsStored or with a Modality LUT Sequence (not linear).
    """
    bits = ds.get("BitsStored")
    if bits is None or "ModalityLUTSequence" in ds:
        return None
    n = int(bits)
    if not 1 <= n <= 32:
        return None
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(2.0 ** (n - 1)), 2.0 ** (n - 1) - 1
    else:
        lo, hi = 0.0, 2.0**n - 1
    slope, intercept = _rescale(ds)
    a, b = sorted((lo * slope + intercept, hi * slope + intercept))
    width = b - a + 1
    return a + 0.5 + (width - 1) / 2, width


def percentile_window(
    values: npt.NDArray[np.floating], percentiles: tuple[float, float] = (0.5, 99.5)
) -> tuple[float, float] | None:
    """A LINEAR window (center, width) from robust percentiles of ``values``.

    None when the percentiles coincide (a flat image).
    """
    flat = np.asarray(values, dtype=np.float32).ravel()
    step = max(1, flat.size // _PERCENTILE_SAMPLES)
    lo, hi = (float(v) for v in np.percentile(flat[::step], percentiles))
    if not hi > lo:
        return None
    # LINEAR maps center - 0.5 - (width-1)/2 .. center - 0.5 + (width-1)/2 to 0..1.
    width = hi - lo + 1.0
    return lo + 0.5 + (width - 1) / 2, width


def apply_window(
    values: npt.NDArray[np.floating],
    center: float | None,
    width: float | None,
    function: str = "LINEAR",
) -> FloatArray:
    """Map values through a VOI window (PS3.3 C.11.2.1.2) onto [0, 1].

    ``function`` is the VOI LUT Function: LINEAR (default), LINEAR_EXACT or SIGMOID.
    With no window, the image's own min..max range is used (robust for images that
    carry none, e.g. secondary captures).
    """
    v = np.asarray(values, dtype=np.float32)
    if center is None or width is None:
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            return np.zeros_like(v)
        return (v - np.float32(lo)) / np.float32(hi - lo)
    fn = function.strip().upper() or "LINEAR"
    if fn == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width must be > 0, got {width}")
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (v - center) / width)), dtype=np.float32)
    if fn == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0, got {width}")
        out = (v - np.float32(center)) / np.float32(width) + np.float32(0.5)
        return np.clip(out, 0.0, 1.0, out=out)
    if fn != "LINEAR":
        raise ValueError(f"unknown VOI LUT function {function!r}")
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    if width == 1:  # a threshold (PS3.3 C.11.2.1.2.1)
        return (v > np.float32(center - 0.5)).astype(np.float32)
    lo = center - 0.5 - (width - 1) / 2
    out = (v - np.float32(lo)) / np.float32(width - 1)
    return np.clip(out, 0.0, 1.0, out=out)


def voi_to_unit(
    values: FloatArray,
    ds: Dataset,
    sources: Sequence[GreySource],
    window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> tuple[FloatArray, GreySource]:
    """Modality values → [0, 1] with the first of ``sources`` that applies.

    Returns the unit image and the source used (``minmax`` when none applied).
    ``window`` is the manifest's own window (the ``manifest`` source).
    """
    for source in sources:
        if source == "manifest" and window is not None:
            return apply_window(values, *window), source
        if source == "header":
            header = window_from_dataset(ds)
            if header is not None:
                function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
                return apply_window(values, *header, function), source
            if "VOILUTSequence" in ds:
                return _voi_lut_sequence(values, ds), source
        if source == "bits":
            win = bits_window(ds)
            if win is not None:
                return apply_window(values, *win), source
        if source == "percentile":
            win = percentile_window(values, percentiles)
            if win is not None:
                return apply_window(values, *win), source
        if source == "minmax":
            break
    return apply_window(values, None, None), "minmax"


def image_to_unit(
    frame: npt.NDArray[np.generic],
    ds: Dataset,
    window: tuple[float, float] | None = None,
    use_dataset_window: bool = True,
    *,
    sources: Sequence[GreySource] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> FloatArray:
    """Modality LUT → VOI → MONOCHROME1 inversion, giving float32 in [0, 1].

    With ``sources`` (a model's declared grey-level sources, see the module
    docstring) the first that applies sets the VOI.  Without it, the older rule:
    ``window`` (from the manifest) wins over the data set's own window; with
    ``use_dataset_window=False`` and no ``window``, min..max is used.  Colour images
    are scaled by their bit depth.
    """
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":  # PS3.3 C.7.6.3.1.5: indices → RGB via the LUT
        from pydicom.pixels import apply_color_lut

        rgb = np.asarray(apply_color_lut(frame, ds), dtype=np.float32)
        desc = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(desc[2]) if desc is not None and int(desc[2]) in (8, 16) else 16
        return rgb / np.float32(2**bits - 1)
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
        bits = int(getattr(ds, "BitsStored", 8) or 8)
        return np.asarray(frame, dtype=np.float32) / np.float32(2**bits - 1)
    values = modality_lut(frame, ds)
    if sources is None:
        sources = _legacy_sources(window, use_dataset_window)
    unit, _ = voi_to_unit(values, ds, sources, window, percentiles)
    if photometric == "MONOCHROME1":
        unit = np.float32(1.0) - unit
    return unit


def _legacy_sources(
    window: tuple[float, float] | None, use_dataset_window: bool
) -> tuple[GreySource, ...]:
    if window is not None:
        return ("manifest",)
    return ("header", "minmax") if use_dataset_window else ("minmax",)


def _voi_lut_sequence(values: FloatArray, ds: Dataset) -> FloatArray:
    """Apply the first VOI LUT (PS3.3 C.11.2.1.1) and scale its output range to [0, 1]."""
    from pydicom.pixels import apply_voi_lut

    item = ds.VOILUTSequence[0]
    stored = np.rint(values).astype(np.int64)  # a LUT is indexed by integer values
    out = np.asarray(apply_voi_lut(stored, ds, index=0, prefer_lut=True), dtype=np.float32)
    bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
    return np.asarray(np.clip(out / np.float32(2**bits - 1), 0.0, 1.0), dtype=np.float32)


def normalise(
    unit: FloatArray, mean: Sequence[float] | float = 0.0, std: Sequence[float] | float = 1.0
) -> FloatArray:
    """``(x - mean) / std`` per channel on a ``(C, H, W)`` or ``(H, W)`` array."""
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    if np.any(s <= 0):
        raise ValueError(f"std must be > 0, got {std}")
    if unit.ndim == 3 and m.ndim == 1:
        m, s = m[:, None, None], s[:, None, None]
    return np.asarray((unit - m) / s, dtype=np.float32)


def to_channels(image: FloatArray, channels: int) -> FloatArray:
    """``(H, W)`` or ``(H, W, S)`` → ``(channels, H, W)``: grey is repeated, RGB → luma."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if image.ndim == 3:
        if channels == 1:
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)[: image.shape[2]]
            grey = (image * weights).sum(axis=2) / weights.sum()
            return np.asarray(grey, dtype=np.float32)[np.newaxis]
        if image.shape[2] == channels:
            return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        raise ValueError(f"cannot map {image.shape[2]} samples to {channels} channels")
    return np.repeat(image[np.newaxis], channels, axis=0).astype(np.float32, copy=False)
