"""Pixel preprocessing shared by training and serving (pure numpy, no torch).

One module so that the two never drift apart.  The steps, in the order PS3.3 C.11
defines the grayscale pipeline:

1. decode the stored pixels (every transfer syntax the receiver accepts: native,
   RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000) with pydicom and the
   pylibjpeg / pyjpegls plugins: :func:`decode_frames`;
2. modality LUT or rescale slope/intercept (PS3.3 C.11.1): :func:`modality_lut`;
3. VOI window (PS3.3 C.11.2) from the model manifest or the data set, to [0, 1]:
   :func:`apply_window`;
4. MONOCHROME1 inversion so that bright always means dense (PS3.3 C.7.6.3.1.2);
5. resampling to the model input with the inverse mapping kept (:class:`SpatialMap`),
   so heatmaps and masks land back on the original pixels;
6. normalisation and channel layout: :func:`normalise`, :func:`to_channels`.

:func:`sort_series` orders the images of a series along the slice normal
(ImagePositionPatient projected on the ImageOrientationPatient normal, PS3.3
C.7.6.2.1.1), falling back to InstanceNumber.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

__all__ = [
    "MAX_DECODED_BYTES",
    "Interpolation",
    "PixelDecodeError",
    "SpatialMap",
    "apply_window",
    "decode_frames",
    "image_to_unit",
    "modality_lut",
    "normalise",
    "pixel_spacing",
    "preprocess_frame",
    "slice_spacing",
    "sort_series",
    "to_channels",
    "window_from_dataset",
]

FloatArray = npt.NDArray[np.float32]
Interpolation = Literal["nearest", "linear", "cubic"]


class PixelDecodeError(ValueError):
    """The pixel data cannot be decoded (unsupported syntax, corrupt stream, no pixels)."""


# --------------------------------------------------------------------------- decoding


#: Largest decoded image (all frames) :func:`decode_frames` accepts: 2 GiB, above any
#: real modality's image (a 100-frame breast tomosynthesis is about 1 GiB).
MAX_DECODED_BYTES = 2 * 1024**3


def _decoded_bytes(ds: Dataset) -> int:
    """Bytes the decoded pixel data of ``ds`` takes, from its header alone."""

    def number(keyword: str, default: int) -> int:
        try:
            return max(0, int(ds.get(keyword, default) or default))
        except (TypeError, ValueError):
            return default

    bits = number("BitsAllocated", 16)
    return (
        number("Rows", 0)
        * number("Columns", 0)
        * number("SamplesPerPixel", 1)
        * number("NumberOfFrames", 1)
        * max(1, (bits + 7) // 8)
    )


def decode_frames(ds: Dataset) -> npt.NDArray[np.generic]:
    """Decode all frames of ``ds`` to ``(frames, rows, cols[, samples])``.

    Colour data in YBR (JPEG) is converted to RGB by pydicom.  Raises
    :class:`PixelDecodeError` (one line) for anything that cannot be decoded, a
    decoder's panic included, so the worker can set the image aside instead of
    crashing or retrying.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PixelDecodeError("data set has no pixel data")
    expected = _decoded_bytes(ds)
    if expected > MAX_DECODED_BYTES:
        # Decoders allocate from the header's dimensions before reading the stream:
        # a damaged Rows, Columns or Number of Frames would otherwise ask for many GiB.
        raise PixelDecodeError(
            f"image would decode to {expected} bytes (over {MAX_DECODED_BYTES}); "
            "its dimensions are implausible"
        )
    try:
        arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pydicom raises many types for bad streams; native
        # decoders (pylibjpeg-rle, written in Rust) raise pyo3's PanicException, a
        # BaseException, on some corrupt streams: still just an undecodable image.
        tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PixelDecodeError(f"cannot decode pixel data ({tsuid}): {msg}") from exc
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if n_frames == 1:
        arr = arr[np.newaxis]
    expected_ndim = 4 if samples > 1 else 3
    if arr.ndim != expected_ndim:
        raise PixelDecodeError(
            f"decoded array has shape {arr.shape}, expected {expected_ndim} dimensions"
        )
    return np.asarray(arr)


# ------------------------------------------------------------------ grey-level steps


def modality_lut(frame: npt.NDArray[np.generic], ds: Dataset) -> FloatArray:
    """Apply the Modality LUT or Rescale Slope/Intercept (PS3.3 C.11.1), as float32.

    CT becomes Hounsfield units.  Colour images pass through unchanged.
    """
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
        return np.asarray(frame, dtype=np.float32)
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    out = np.asarray(frame, dtype=np.float32)
    if slope != 1.0:
        out = out * np.float32(slope)
    if intercept != 0.0:
        out = out + np.float32(intercept)
    return out


def _first(value: object) -> float | None:
    """First value of a possibly multi-valued DS/IS element, as float (None if absent)."""
    if value is None or (isinstance(value, (str, bytes)) and not value):
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if not value:
            return None
        value = value[0]
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def window_from_dataset(ds: Dataset) -> tuple[float, float] | None:
    """The first VOI window (center, width) stored in the data set, or None."""
    center = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return center, width


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


def image_to_unit(
    frame: npt.NDArray[np.generic],
    ds: Dataset,
    window: tuple[float, float] | None = None,
    use_dataset_window: bool = True,
) -> FloatArray:
    """Modality LUT → VOI window → MONOCHROME1 inversion, giving float32 in [0, 1].

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
    function = "LINEAR"
    if window is None and use_dataset_window:
        window = window_from_dataset(ds)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        if window is None and "VOILUTSequence" in ds:
            unit = _voi_lut_sequence(values, ds)
            return np.float32(1.0) - unit if photometric == "MONOCHROME1" else unit
    center, width = window if window else (None, None)
    unit = apply_window(values, center, width, function)
    if photometric == "MONOCHROME1":
        unit = np.float32(1.0) - unit
    return unit


def _voi_lut_sequence(values: FloatArray, ds: Dataset) -> FloatArray:
    """Apply the first VOI LUT (PS3.3 C.11.2.1.1) and scale its output range to [0, 1]."""
    from pydicom.pixels import apply_voi_lut

    item = ds.VOILUTSequence[0]
    stored = np.rint(values).astype(np.int64)  # a LUT is indexed by integer values
    out = np.asarray(apply_voi_lut(stored, ds, index=0, prefer_lut=True), dtype=np.float32)
    bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
    return np.clip(out / np.float32(2**bits - 1), 0.0, 1.0)


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
            return grey[np.newaxis].astype(np.float32)
        if image.shape[2] == channels:
            return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        raise ValueError(f"cannot map {image.shape[2]} samples to {channels} channels")
    return np.repeat(image[np.newaxis], channels, axis=0).astype(np.float32, copy=False)


# ------------------------------------------------------------------------ resampling


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


def preprocess_frame(
    frame: npt.NDArray[np.generic],
    ds: Dataset,
    size: tuple[int, int],
    channels: int = 1,
    window: tuple[float, float] | None = None,
    use_dataset_window: bool = True,
    mean: Sequence[float] | float = 0.0,
    std: Sequence[float] | float = 1.0,
) -> tuple[FloatArray, SpatialMap]:
    """One decoded frame → model input ``(channels, h, w)`` float32, plus its map."""
    unit = image_to_unit(frame, ds, window, use_dataset_window)
    smap = SpatialMap((int(unit.shape[0]), int(unit.shape[1])), (int(size[0]), int(size[1])))
    chw = to_channels(unit, channels)
    resized = smap.forward(chw, "linear")
    return normalise(resized, mean, std), smap


# -------------------------------------------------------------------- series geometry


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
        value = _first(sorted_datasets[0].get(keyword)) if sorted_datasets else None
        if value is not None and value > 0:
            return value
    return None
