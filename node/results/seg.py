"""Binary DICOM SEG (PS3.3 A.51) aligned frame by frame with the source images.

``InferenceResult.mask`` is a label map in source order; each non-empty source image
becomes one frame per segment present on it, referencing that image (Derivation Image
Sequence). Only the images that carry a segment are handed to highdicom: its cost
grows with the number of source images it checks, and empty frames would be omitted
anyway (``omit_empty_frames``), so the SEG is the same at a fraction of the time.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from models.result import InferenceResult
from node.config import NodeConfig
from node.results import codes
from node.results.common import SourceIndex, add_ai_equipment, object_identity, uid_for

__all__ = ["build_seg", "encode_seg"]


def encode_seg(
    result: InferenceResult, sources: Sequence[Dataset], cfg: NodeConfig
) -> Dataset | None:
    """The SEG of ``result.mask``; ``None`` when there is no mask or it is empty."""
    return build_seg(result, SourceIndex(result, sources), cfg)


def build_seg(result: InferenceResult, src: SourceIndex, cfg: NodeConfig) -> Dataset | None:
    """:func:`encode_seg` on an already checked :class:`SourceIndex`."""
    mask = result.mask
    if mask is None:
        return None
    present = np.flatnonzero(mask.reshape(mask.shape[0], -1).max(axis=1) > 0)
    if present.size == 0:
        return None
    described = {s.number: s for s in result.segments}
    labels = sorted(int(v) for v in np.unique(mask[present]) if v > 0)
    undescribed = [v for v in labels if v not in described]
    if undescribed:
        raise ValueError(f"result.segments: no description for mask label(s) {undescribed}")
    model = result.model
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name[:64], family=codes.AI_FAMILY, version=model.version[:64]
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s.number,
            segment_label=s.label[:64],
            segmented_property_category=codes.to_code(s.category),
            segmented_property_type=codes.to_code(s.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=uid_for(result, "segment", s.number),
            tracking_id=f"{s.label} {s.number}"[:64],
        )
        for s in sorted(result.segments, key=lambda s: s.number)
    ]
    images = [src.ordered[int(i)] for i in present]
    seg = hd.seg.Segmentation(
        source_images=images,
        pixel_array=np.ascontiguousarray(mask[present]),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        **object_identity(result, "seg", cfg.results.manufacturer),
        content_label="AI_SEG",
        content_description=f"AI segmentation {model.name} {model.version}"[:64],
        series_description=f"AI segmentation {model.name} {model.version}"[:64],
        omit_empty_frames=True,
    )
    # highdicom draws the dimension organisation UID at random; a deterministic one
    # keeps a re-run's SEG byte-identical (PS3.3 C.7.6.17.1).
    dimension_uid = uid_for(result, "seg-dimension")
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = dimension_uid
    add_ai_equipment(seg, result, cfg.results.manufacturer)
    return seg
