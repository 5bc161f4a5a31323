"""Grayscale Softcopy Presentation State (PS3.3 A.33.1) with the findings as annotations.

Many PACS viewers show neither SR nor SEG, but nearly all apply a presentation state to
the original images: the finding is drawn on the source pixels (outline of the lesion
or of the heatmap's hot region, a marker at the peak, a text with the finding and its
probability), in the display window suited to the finding site, without a burned-in
copy of the image. One GSPS per result, in its own series of the source study,
referencing every image it annotates (PS3.3 C.11.11 Graphic Annotation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset

from models.result import InferenceResult
from node.config import NodeConfig
from node.results import codes
from node.results.common import (
    SourceIndex,
    add_ai_equipment,
    display_window,
    finding_site,
    object_identity,
    uid_for,
)
from node.results.geometry import place

__all__ = ["build_gsps", "encode_gsps", "finding_text"]

#: Annotation colour: yellow (CIELab), the colour readers expect for CAD marks.
_YELLOW = hd.color.CIELabColor(97.1, -21.6, 94.5)
#: Half the size of the cross drawn at the peak, as a fraction of the image's short side.
_MARKER = 0.02


def finding_text(label: str, probability: float, positive: bool) -> str:
    """What a reader sees next to the finding, e.g. ``"Nodule p=0.93 (positive)"``."""
    return f"{label} p={probability:.2f} ({'positive' if positive else 'negative'})"


def encode_gsps(
    result: InferenceResult, sources: Sequence[Dataset], cfg: NodeConfig
) -> Dataset | None:
    """The presentation state of ``result``; ``None`` when no finding has a location."""
    return build_gsps(result, SourceIndex(result, sources), cfg)


def build_gsps(result: InferenceResult, src: SourceIndex, cfg: NodeConfig) -> Dataset | None:
    """:func:`encode_gsps` on an already checked :class:`SourceIndex`."""
    model = result.model
    layer = hd.pr.GraphicLayer(
        layer_name="AI",
        order=1,
        description=f"AI findings {model.name} {model.version}"[:64],
        display_color=_YELLOW,
    )
    per_image: dict[str, tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]] = {}
    window: tuple[float, float] | None = None
    for i, finding in enumerate(result.findings):
        where = place(result, finding)
        if where is None:
            continue
        image = src.get(where.sop_instance_uid)
        rows, cols = int(image.Rows), int(image.Columns)
        tracking: dict[str, Any] = {
            "tracking_id": f"{finding.label} #{i + 1}"[:64],
            "tracking_uid": uid_for(result, "tracking", i),
        }
        graphics, texts = per_image.setdefault(where.sop_instance_uid, ([], []))
        if where.outline is not None:
            graphics.append(
                hd.pr.GraphicObject(
                    graphic_type="POLYLINE",
                    graphic_data=where.outline,
                    units="PIXEL",
                    **tracking,
                )
            )
        x, y = where.peak
        arm = max(2.0, _MARKER * min(rows, cols))
        for a, b in (((x - arm, y), (x + arm, y)), ((x, y - arm), (x, y + arm))):
            graphics.append(
                hd.pr.GraphicObject(
                    graphic_type="POLYLINE",
                    graphic_data=np.clip(np.array([a, b]), 0.0, [cols, rows]),
                    units="PIXEL",
                    **tracking,
                )
            )
        top = float(where.outline[:, 1].min()) if where.outline is not None else y - arm
        height = max(8.0, rows / 24)
        box_top = top - height - 2 if top - height - 2 >= 0 else min(rows - height, y + arm + 2)
        texts.append(
            hd.pr.TextObject(
                text_value=finding_text(
                    finding.finding_type.meaning, finding.probability, finding.positive
                ),
                units="PIXEL",
                bounding_box=(
                    max(0.0, x - cols / 4),
                    max(0.0, box_top),
                    min(float(cols), x + cols / 4),
                    min(float(rows), max(0.0, box_top) + height),
                ),
                **tracking,
            )
        )
        if window is None:
            site = finding_site(
                codes.to_code(finding.finding_site) if finding.finding_site else None, image
            )
            window = display_window(image, site)
    if not per_image:
        return None
    images = [src.get(uid) for uid in per_image]
    annotations = [
        hd.pr.GraphicAnnotation(
            referenced_images=[src.get(uid)],
            graphic_layer=layer,
            graphic_objects=graphics or None,
            text_objects=texts or None,
        )
        for uid, (graphics, texts) in per_image.items()
    ]
    voi = None
    if window is not None:
        voi = [
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=window[0],
                window_width=window[1],
                window_explanation="AI finding site",
            )
        ]
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        **object_identity(result, "pr", cfg.results.manufacturer),
        content_label="AI_FINDINGS",
        content_description=f"AI findings {model.name} {model.version}"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        voi_lut_transformations=voi,
        institution_name=cfg.results.institution_name,
    )
    pr.SeriesDescription = f"AI findings {model.name} {model.version}"[:64]
    # General Series Laterality (Type 2C, PS3.3 C.7.3.1): the source's, empty if unknown;
    # dicom3tools requires it for a presentation state.
    pr.Laterality = str(images[0].get("Laterality", "") or "")
    add_ai_equipment(pr, result, cfg.results.manufacturer)
    return pr
