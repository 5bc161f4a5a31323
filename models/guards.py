"""Input guards: is this series something the model was made for?

A model answers whatever it is given: the first demo classifier called an ultrasound
image "nodule, p 1.00" and the segmenter found a 28 cm³ "lesion" in a head CT's
headrest.  The manifest therefore declares the input the model was trained on
(``[input]`` of :class:`models.package.InputSpec`), and :func:`check_input` compares a
series' headers against it before any pixel is decoded.  A series outside gets no
model output; the worker records the reasons with the job.

What is checked (only what the manifest declares; an empty list or ``None`` means
"any"):

* ``modalities`` — Modality (0008,0060);
* ``body_parts`` — Body Part Examined (0018,0015), *where the header gives one*
  (many modalities leave it empty; absence is not a reason to refuse);
* ``photometric`` — Photometric Interpretation (0028,0004);
* ``samples_per_pixel`` — Samples per Pixel (0028,0002);
* ``max_frames`` — Number of Frames (0028,0008) of each instance;
* ``min_matrix`` — Rows and Columns, each at least the declared minimum;
* ``pixel_spacing_mm`` — Pixel Spacing, else Imager Pixel Spacing, within [min, max];
  an image without either is refused when a range is declared (sizes and volumes
  would be meaningless);
* ``min_field_of_view_mm`` — rows x row spacing and columns x column spacing, so a
  cropped or magnified view of a small region is not read as a whole chest;
* ``slice_thickness_mm`` — Slice Thickness, or the spacing of the sorted positions,
  within [min, max] (volumes);
* ``min_images`` — images in the series (a lesion volume needs slices).

Reasons are one line each, name the attribute and the value found, and never quote
patient data.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from models.package import InputSpec, Manifest
from models.preprocess import pixel_spacing, slice_spacing, sort_series

__all__ = ["check_input"]


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        return default


def _distinct(values: Sequence[str]) -> str:
    seen = sorted({v or "(empty)" for v in values})
    return ", ".join(seen[:4]) + (" ..." if len(seen) > 4 else "")


def check_input(manifest: Manifest | InputSpec, datasets: Sequence[Dataset]) -> list[str]:
    """Reasons why ``datasets`` (one series) is outside the model's declared input.

    An empty list means the series may be analysed.  Only headers are read.
    """
    spec = manifest.input if isinstance(manifest, Manifest) else manifest
    if not datasets:
        return ["the series has no images"]
    reasons: list[str] = []
    allowed = {m.upper() for m in spec.modalities}
    if allowed:
        bad = [_text(ds, "Modality") for ds in datasets if _text(ds, "Modality") not in allowed]
        if bad:
            accepted = ", ".join(sorted(allowed))
            reasons.append(f"Modality {_distinct(bad)} is not one the model accepts ({accepted})")
    parts = {p.upper() for p in spec.body_parts}
    if parts:
        bad = [
            _text(ds, "BodyPartExamined")
            for ds in datasets
            if _text(ds, "BodyPartExamined") and _text(ds, "BodyPartExamined") not in parts
        ]
        if bad:
            reasons.append(
                f"Body Part Examined {_distinct(bad)} is not one the model accepts "
                f"({', '.join(sorted(parts))})"
            )
    photometric = {p.upper() for p in spec.photometric}
    if photometric:
        bad = [
            _text(ds, "PhotometricInterpretation")
            for ds in datasets
            if _text(ds, "PhotometricInterpretation") not in photometric
        ]
        if bad:
            reasons.append(
                f"Photometric Interpretation {_distinct(bad)} is not one the model accepts "
                f"({', '.join(sorted(photometric))})"
            )
    if spec.samples_per_pixel is not None:
        bad = [
            str(_int(ds, "SamplesPerPixel", 1))
            for ds in datasets
            if _int(ds, "SamplesPerPixel", 1) != spec.samples_per_pixel
        ]
        if bad:
            reasons.append(
                f"Samples per Pixel {_distinct(bad)}; the model takes {spec.samples_per_pixel}"
            )
    if spec.max_frames is not None:
        frames = max(_int(ds, "NumberOfFrames", 1) for ds in datasets)
        if frames > spec.max_frames:
            reasons.append(
                f"Number of Frames {frames}; the model takes at most {spec.max_frames} per image"
            )
    if spec.min_matrix is not None:
        small = [
            f"{_int(ds, 'Rows', 0)}x{_int(ds, 'Columns', 0)}"
            for ds in datasets
            if _int(ds, "Rows", 0) < spec.min_matrix[0]
            or _int(ds, "Columns", 0) < spec.min_matrix[1]
        ]
        if small:
            reasons.append(
                f"matrix {_distinct(small)} is smaller than the model's minimum "
                f"{spec.min_matrix[0]}x{spec.min_matrix[1]}"
            )
    spacings = [pixel_spacing(ds) for ds in datasets]
    if spec.pixel_spacing_mm is not None:
        lo, hi = spec.pixel_spacing_mm
        if any(s is None for s in spacings):
            reasons.append("no Pixel Spacing or Imager Pixel Spacing: sizes cannot be known")
        else:
            bad = [
                f"{min(s):g}-{max(s):g}" for s in spacings if s and not lo <= min(s) <= max(s) <= hi
            ]
            if bad:
                reasons.append(
                    f"pixel spacing {_distinct(bad)} mm is outside the model's {lo:g}-{hi:g} mm"
                )
    if spec.min_field_of_view_mm is not None:
        fovs = [
            min(_int(ds, "Rows", 0) * s[0], _int(ds, "Columns", 0) * s[1])
            for ds, s in zip(datasets, spacings, strict=True)
            if s is not None
        ]
        if fovs and min(fovs) < spec.min_field_of_view_mm:
            reasons.append(
                f"field of view {min(fovs):.0f} mm is smaller than the model's minimum "
                f"{spec.min_field_of_view_mm:g} mm"
            )
    if len(datasets) < spec.min_images:
        reasons.append(
            f"the series has {len(datasets)} image(s); the model needs at least {spec.min_images}"
        )
    if spec.slice_thickness_mm is not None and len(datasets) >= 2:
        lo, hi = spec.slice_thickness_mm
        dz = slice_spacing(sort_series(datasets))
        thick = _thickness(datasets[0])
        value = thick if thick is not None else dz
        if value is None:
            reasons.append("neither Slice Thickness nor image positions give the slice spacing")
        elif not lo <= value <= hi:
            reasons.append(f"slice thickness {value:g} mm is outside the model's {lo:g}-{hi:g} mm")
    return reasons


def _thickness(ds: Dataset) -> float | None:
    try:
        value = float(ds.get("SliceThickness", 0) or 0)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None
