"""Decoding the stored pixels of every transfer syntax the receiver accepts.

Native, RLE, JPEG baseline/extended/lossless, JPEG-LS and JPEG 2000 through pydicom
and the pylibjpeg / pyjpegls plugins (PS3.5 section 8 and annex A).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

__all__ = ["MAX_DECODED_BYTES", "PixelDecodeError", "decode_frames"]


class PixelDecodeError(ValueError):
    """The pixel data cannot be decoded (unsupported syntax, corrupt stream, no pixels)."""


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
