"""RGB Secondary Capture heatmaps (PS3.3 A.8.1): the source image in the window suited
to the finding, the model's activation on top, and a band below the image with the
legend, the finding, its probability and a notice.

PACS viewers that show neither SR nor SEG still show a secondary capture, so this is
how many readers will see the result, and it must not mislead:

* the colours mean one thing: **relative activation within this image** (the map is
  scaled to its own maximum; it is not the probability, and the legend says so);
* faint activation stays transparent, and the hot region (``HOT_FRACTION`` of the
  peak) is outlined, so the finding under it stays visible;
* no colour outside the body;
* text and legend sit in a band below the image, never over anatomy, sized
  relative to the image;
* the window comes from :func:`node.results.common.display_window` (a lung window for
  lung findings on CT) through ``models.preprocess.image_to_unit``, the one windowing
  function training, inference and display share.

Because text is part of the pixels, Burned In Annotation is YES (PS3.3 C.7.6.1.1.1).
Each capture lives in the source study in a series of its own and references its
source image (Source Image Sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from models.preprocess import decode_frames, image_to_unit, modality_lut
from models.result import InferenceResult
from node.config import NodeConfig
from node.results import codes
from node.results.common import (
    SERIES_NUMBER,
    SourceIndex,
    add_ai_equipment,
    display_window,
    finding_site,
    uid_for,
)
from node.results.geometry import HOT_FRACTION
from node.results.pr import finding_text

__all__ = ["HEAT_FLOOR", "body_mask", "build_heatmap_sc", "encode_heatmap_sc", "jet", "render"]

_Float = npt.NDArray[np.float32]
_U8 = npt.NDArray[np.uint8]
_Bool = npt.NDArray[np.bool_]

#: Activation below this fraction of the image's maximum stays fully transparent.
HEAT_FLOOR = 0.2
#: Opacity of the overlay at the peak: the anatomy under it stays visible.
MAX_ALPHA = 0.5
#: CT voxels above this (HU) are body; air outside the patient is about -1000.
BODY_HU = -500.0

LEGEND_TITLE = "AI activation, relative to this image (not probability)"
MASK_TITLE = "AI segmentation outline"


def jet(x: _Float) -> _U8:
    """A jet-like colour map: 0 → dark blue, 0.5 → green, 1 → dark red; shape (..., 3)."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def _fill_spans(mask: _Bool) -> _Bool:
    """Fill each row and each column between its first and last True; keep the overlap.

    The lungs (air inside the chest) are enclosed by the body in both directions and
    are filled; the air around the patient is not.
    """

    def spans(m: _Bool) -> _Bool:
        any_ = np.asarray(m.any(axis=1), dtype=bool)
        first = np.argmax(m, axis=1)
        last = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
        idx = np.arange(m.shape[1])[None, :]
        return np.asarray(any_[:, None] & (idx >= first[:, None]) & (idx <= last[:, None]))

    return spans(mask) & spans(mask.T).T


def body_mask(ds: Dataset, frame: npt.NDArray[np.generic]) -> _Bool:
    """Where the patient is: CT above ``BODY_HU``; otherwise above a tenth of the image's
    grey-level range (MONOCHROME1 inverted first); holes filled row- and column-wise."""
    if str(ds.get("Modality", "")) == "CT":
        inside = modality_lut(frame, ds) > BODY_HU
    else:
        unit = image_to_unit(frame, ds, None, use_dataset_window=False)
        if unit.ndim == 3:
            unit = unit.mean(axis=-1)
        lo, hi = np.percentile(unit, [1.0, 99.0])
        inside = unit > lo + 0.1 * (hi - lo)
    return _fill_spans(np.asarray(inside, dtype=bool))


def _resize(heat: _Float, rows: int, cols: int) -> _Float:
    if heat.shape == (rows, cols):
        return heat
    ri = (np.arange(rows) * heat.shape[0] // rows).clip(0, heat.shape[0] - 1)
    ci = (np.arange(cols) * heat.shape[1] // cols).clip(0, heat.shape[1] - 1)
    return heat[np.ix_(ri, ci)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _edge(mask: _Bool) -> _Bool:
    """Pixels of ``mask`` with a 4-neighbour outside it (a one-pixel outline)."""
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def render(
    grey: _Float,
    heat: _Float,
    lines: Sequence[str],
    *,
    body: _Bool | None = None,
    title: str = LEGEND_TITLE,
    legend: bool = True,
) -> _U8:
    """The capture: ``grey`` with ``heat`` blended on it, then a band with ``lines``.

    ``heat`` in [0, 1] (relative to this image) is transparent below ``HEAT_FLOOR``,
    rises to ``MAX_ALPHA`` at 1, is outlined where it reaches ``HOT_FRACTION`` and is
    cut to ``body``. The band below the image (about a sixth of its height) holds the
    legend bar with its title and the text lines, on black.
    """
    rows, cols = grey.shape
    heat = np.clip(_resize(heat.astype(np.float32), rows, cols), 0.0, 1.0)
    if body is not None:
        heat = np.where(body, heat, 0.0).astype(np.float32)
    base = np.repeat((grey * 255.0)[..., None], 3, axis=-1)
    alpha = (MAX_ALPHA * np.clip((heat - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0))[..., None]
    image = base * (1.0 - alpha) + jet(heat).astype(np.float32) * alpha
    hot = heat >= HOT_FRACTION * max(float(heat.max()), 1e-6)
    if heat.max() > 0:
        image[_edge(hot)] = (255.0, 255.0, 0.0)  # outline of the hot region, yellow
    size = max(10, min(rows, cols) // 28)
    font = _font(size)
    n_text = len(lines) + (2 if legend else 1)
    band = n_text * (size + 4) + 8
    out = np.zeros((rows + band, cols, 3), dtype=np.float32)
    out[:rows] = image
    canvas = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(canvas)

    def fit(text: str) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
        f, n = font, size
        while n > 8 and draw.textlength(text, font=f) > cols - 8:
            n -= 1
            f = _font(n)
        return f

    y = rows + 4
    if legend:
        draw.text((4, y), title, fill=(255, 255, 255), font=fit(title))
        y += size + 4
        low, high = "low", "high"
        small = fit(low)
        x0 = 8 + int(draw.textlength(low, font=small))
        x1 = cols - 8 - int(draw.textlength(high, font=small))
        if x1 - x0 >= 16:
            ramp = np.linspace(0.0, 1.0, x1 - x0, dtype=np.float32)
            bar = np.repeat(jet(ramp)[None], max(4, size - 2), axis=0)
            canvas.paste(Image.fromarray(bar, mode="RGB"), (x0, y + 2))
            draw.text((4, y), low, fill=(255, 255, 255), font=small)
            draw.text((x1 + 4, y), high, fill=(255, 255, 255), font=small)
        y += size + 4
    else:
        draw.text((4, y), title, fill=(255, 255, 0), font=fit(title))
        y += size + 4
    for line in lines:
        draw.text((4, y), line, fill=(255, 255, 0), font=fit(line))
        y += size + 4
    return np.asarray(canvas, dtype=np.uint8)


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
    """One RGB secondary capture per selected image (see :func:`select_images`)."""
    return build_heatmap_sc(result, SourceIndex(result, sources), cfg)


def _lines(result: InferenceResult, uid: str) -> list[str]:
    """Finding text for the image ``uid`` (findings that point to it), then the notice."""
    model = result.model
    found = [
        finding_text(f.finding_type.meaning, f.probability, f.positive)
        for f in result.findings
        if uid in f.source_sop_instance_uids or (f.peak is not None and f.peak[0] == uid)
    ]
    return [*found[:3], f"NOT FOR DIAGNOSTIC USE - AI {model.name} {model.version}"]


def build_heatmap_sc(result: InferenceResult, src: SourceIndex, cfg: NodeConfig) -> list[Dataset]:
    """:func:`encode_heatmap_sc` on an already checked :class:`SourceIndex`."""
    model = result.model
    series_uid = uid_for(result, "sc-series")
    first = result.findings[0] if result.findings else None
    out: list[Dataset] = []
    for n, (uid, heat) in enumerate(select_images(result, cfg.results.heatmap_max_images)):
        source = src.get(uid)
        frame = decode_frames(source)[0]
        site = finding_site(
            codes.to_code(first.finding_site) if first and first.finding_site else None, source
        )
        window = display_window(source, site)
        grey = image_to_unit(frame, source, window, use_dataset_window=False)
        if grey.ndim == 3:
            grey = grey.mean(axis=-1)
        is_mask = not result.heatmaps
        pixels = render(
            grey.astype(np.float32),
            heat,
            _lines(result, uid),
            body=body_mask(source, frame),
            title=MASK_TITLE if is_mask else LEGEND_TITLE,
            legend=not is_mask,
        )
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
        sc.SeriesDate, sc.SeriesTime = sc.ContentDate, sc.ContentTime
        # Laterality (General Series, Type 2C, PS3.3 C.7.3.1: required for paired body
        # parts): the source's L/R; absent when the body part is known and the side is
        # not; empty only when even the body part is unknown (it might be paired).
        body_part = str(source.get("BodyPartExamined") or "")
        if body_part:
            sc.BodyPartExamined = body_part
        laterality = str(source.get("Laterality") or source.get("ImageLaterality") or "")
        if laterality in ("L", "R"):
            sc.Laterality = laterality
        elif body_part:
            if "Laterality" in sc:
                del sc.Laterality
        else:
            sc.Laterality = ""
        if source.get("StudyDescription"):
            sc.StudyDescription = source.StudyDescription
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.DerivationDescription = (
            f"AI heatmap ({model.name} {model.version}) over source image; colours: "
            "activation relative to this image, not probability"
        )[:1024]
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([ref])
        add_ai_equipment(sc, result, cfg.results.manufacturer)
        out.append(sc)
    return out
