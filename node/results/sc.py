"""RGB Secondary Capture heatmaps (PS3.3 A.8.1): the source image, windowed for display,
with the heatmap blended on top, a colour legend and a burned-in notice.

PACS viewers that show neither SR nor SEG still show a secondary capture, so this is
how most readers will see the result. Because the notice is part of the pixels,
Burned In Annotation is YES (PS3.3 C.7.6.1.1.1). Each capture lives in the source
study in a series of its own and references its source image (Source Image Sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence as DicomSequence

from models.result import InferenceResult
from node.config import NodeConfig
from node.results.common import SERIES_NUMBER, SourceIndex, add_ai_equipment, uid_for

__all__ = ["build_heatmap_sc", "encode_heatmap_sc", "jet", "select_images"]

_Float = npt.NDArray[np.float32]
_U8 = npt.NDArray[np.uint8]
_OUTLINE: dict[str, Any] = {"stroke_width": 1, "stroke_fill": (0, 0, 0)}


def jet(x: _Float) -> _U8:
    """A jet-like colour map: 0 → dark blue, 0.5 → green, 1 → dark red; shape (..., 3)."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def _display(ds: Dataset) -> _Float:
    """The image as display grey levels in [0, 1]: modality LUT, VOI window, MONOCHROME1."""
    arr = ds.pixel_array
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        rgb = arr[0] if arr.ndim == 4 else arr
        return np.asarray(rgb.astype(np.float32).mean(axis=-1) / 255.0, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[0]
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        c = float(centre[0] if isinstance(centre, Sequence) else centre)
        w = max(float(width[0] if isinstance(width, Sequence) else width), 1.0)
        lo, hi = c - w / 2.0, c + w / 2.0
    else:
        lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    grey = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 1.0 - grey
    return np.asarray(grey, dtype=np.float32)


def _resize(heat: _Float, rows: int, cols: int) -> _Float:
    if heat.shape == (rows, cols):
        return heat
    ri = (np.arange(rows) * heat.shape[0] // rows).clip(0, heat.shape[0] - 1)
    ci = (np.arange(cols) * heat.shape[1] // cols).clip(0, heat.shape[1] - 1)
    return heat[np.ix_(ri, ci)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


HEAT_FLOOR = 0.2


def render(grey: _Float, heat: _Float, notice: Sequence[str]) -> _U8:
    """Blend ``heat`` over ``grey``, add the legend bar and burn in ``notice`` lines."""
    rows, cols = grey.shape
    heat = np.clip(_resize(heat.astype(np.float32), rows, cols), 0.0, 1.0)
    base = np.repeat((grey * 255.0)[..., None], 3, axis=-1)
    # Faint activation stays transparent so the anatomy is not tinted all over; the
    # overlay fades in from HEAT_FLOOR to 60 % opacity at the peak.
    alpha = (0.6 * np.clip((heat - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0))[..., None]
    out = base * (1.0 - alpha) + jet(heat).astype(np.float32) * alpha
    # Legend: a vertical bar at the right edge, 1 at the top, 0 at the bottom.
    bar_w = max(4, cols // 32)
    top, bottom = rows // 5, rows - rows // 5
    if bottom - top >= 8:
        ramp = np.linspace(1.0, 0.0, bottom - top, dtype=np.float32)[:, None]
        out[top:bottom, cols - 2 * bar_w : cols - bar_w] = jet(np.repeat(ramp, bar_w, axis=1))
    img = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    size = max(8, min(rows, cols) // 28)
    font = _font(size)
    y = 2
    for line in notice:
        while size > 8 and draw.textlength(line, font=font) > cols - 4:
            size -= 1
            font = _font(size)
        draw.text((2, y), line, fill=(255, 255, 0), font=font, **_OUTLINE)
        y += size + 3
    if bottom - top >= 8:
        small = _font(max(8, size - 2))
        x = max(0, cols - 2 * bar_w - int(draw.textlength("1.0", font=small)) - 2)
        draw.text((x, top), "1.0", fill=(255, 255, 255), font=small, **_OUTLINE)
        draw.text((x, bottom - size), "0.0", fill=(255, 255, 255), font=small, **_OUTLINE)
    return np.asarray(img, dtype=np.uint8)


def _orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (PS3.3 C.7.6.1.1.1) of rows and columns, from the source."""
    po = ds.get("PatientOrientation")
    if po is not None and len(po) == 2 and all(po):
        return str(po[0]), str(po[1])
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return "L", "P"  # axial default; only a display hint

    def letters(v: Sequence[float]) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        order = sorted(range(3), key=lambda i: -abs(float(v[i])))
        big = [i for i in order if abs(float(v[i])) > 0.3]
        out = "".join(names[i][0 if float(v[i]) > 0 else 1] for i in big)
        return out or "L"

    return letters(iop[:3]), letters(iop[3:])


def select_images(result: InferenceResult, limit: int) -> list[tuple[str, _Float]]:
    """The images to capture, most relevant first: those with a heatmap, ranked by peak.

    A segmentation result without heatmaps uses its mask: the slices with the most
    lesion pixels. At most ``limit`` images.
    """
    if limit <= 0:
        return []
    if result.heatmaps:
        ranked = sorted(result.heatmaps.items(), key=lambda kv: -float(np.max(kv[1])))
        return [(uid, np.asarray(h, dtype=np.float32)) for uid, h in ranked[:limit]]
    if result.mask is None:
        return []
    areas = (result.mask > 0).reshape(result.mask.shape[0], -1).sum(axis=1)
    picks = [int(i) for i in np.argsort(-areas, kind="stable")[:limit] if areas[i] > 0]
    picks.sort()
    return [
        (result.source_sop_instance_uids[i], (result.mask[i] > 0).astype(np.float32)) for i in picks
    ]


def encode_heatmap_sc(
    result: InferenceResult, sources: Sequence[Dataset], cfg: NodeConfig
) -> list[Dataset]:
    """One RGB secondary capture per selected image (``cfg.results.heatmap_max_images``)."""
    return build_heatmap_sc(result, SourceIndex(result, sources), cfg)


def build_heatmap_sc(result: InferenceResult, src: SourceIndex, cfg: NodeConfig) -> list[Dataset]:
    """:func:`encode_heatmap_sc` on an already checked :class:`SourceIndex`."""
    model = result.model
    notice = ["NOT FOR DIAGNOSTIC USE", f"AI RESULT {model.name} {model.version}"]
    series_uid = uid_for(result, "sc-series")
    out: list[Dataset] = []
    for n, (uid, heat) in enumerate(select_images(result, cfg.results.heatmap_max_images)):
        source = src.get(uid)
        pixels = render(_display(source), heat, notice)
        spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=SERIES_NUMBER["sc"],
            sop_instance_uid=uid_for(result, "sc", n),
            instance_number=n + 1,
            manufacturer=cfg.results.manufacturer,
            pixel_spacing=(  # highdicom annotates ints; PS3.3 says DS
                (float(spacing[0]), float(spacing[1])) if spacing else None  # type: ignore[arg-type]
            ),
            patient_orientation=_orientation(source),
            transfer_syntax_uid=hd.UID("1.2.840.10008.1.2.1"),
            series_description=f"AI heatmap {model.name} {model.version}"[:64],
        )
        sc.BurnedInAnnotation = "YES"
        # General Series Laterality is Type 2C (PS3.3 C.7.3.1): present, copied or empty.
        sc.Laterality = source.get("Laterality", source.get("ImageLaterality", ""))
        if sc.Laterality == "U":
            sc.Laterality = ""
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.DerivationDescription = f"AI heatmap ({model.name} {model.version}) over source image"[
            :1024
        ]
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([ref])
        add_ai_equipment(sc, result, cfg.results.manufacturer)
        out.append(sc)
    return out
