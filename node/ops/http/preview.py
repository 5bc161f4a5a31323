"""PNG previews of the secondary-capture heatmaps in the outbox, for the status page.

The SC object is the file the PACS gets (PS3.3 A.8, RGB with the heatmap burned in),
so the preview shows exactly what a radiologist will see, downscaled.  The file is
found through the ``results`` table, never through a path from the request, and must
lie inside the outbox.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from node.store.db import Database, Result

__all__ = ["MAX_PREVIEW_PX", "PreviewError", "render_png", "result_preview"]

MAX_PREVIEW_PX = 384


class PreviewError(Exception):
    """No preview for this result (unknown id, not an image, file gone); HTTP 404."""


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return ((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def render_png(path: Path, max_px: int = MAX_PREVIEW_PX) -> bytes:
    """A PNG of the first frame of the DICOM image at ``path``, at most ``max_px`` wide/high."""
    if max_px < 16:
        raise ValueError(f"max_px: must be >= 16, got {max_px}")
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as exc:
        raise PreviewError(f"cannot decode the image ({type(exc).__name__})") from None
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples == 3:
        if str(getattr(ds, "PhotometricInterpretation", "RGB")) != "RGB":
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, str(ds.PhotometricInterpretation), "RGB")
        img = Image.fromarray(arr.astype(np.uint8) if arr.dtype != np.uint8 else arr, "RGB")
    elif samples == 1:
        img8 = _to_uint8(arr)
        if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
            img8 = 255 - img8
        img = Image.fromarray(img8, "L")
    else:
        raise PreviewError(f"unsupported samples per pixel {samples}")
    img.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def result_preview(db: Database, outbox_dir: Path, result_id: int) -> bytes:
    """The PNG preview of result ``result_id`` (an SC); raises :class:`PreviewError`."""
    with db.read() as s:
        row = s.get(Result, result_id)
        if row is None:
            raise PreviewError(f"no result {result_id}")
        kind, rel = row.kind, row.path
    if kind != "sc":
        raise PreviewError(f"result {result_id} is a {kind}, not an image")
    root = outbox_dir.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise PreviewError(f"result {result_id}: path outside the outbox")
    if not path.is_file():
        raise PreviewError(f"result {result_id}: file no longer in the outbox")
    return render_png(path)
