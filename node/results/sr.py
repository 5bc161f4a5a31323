"""Comprehensive 3D SR, TID 1500 Measurement Report, following the IHE AI Results profile.

One measurement group per finding (TID 1410/1411/1501) carries a tracking identifier,
the finding type and site, the probability (a numeric measurement, UCUM "1") and the
presence at the operating threshold (a qualitative evaluation), measurements such as
lesion volume, and references to where the finding is:

* a heatmap peak → TID 1410 planar ROI with a POINT SCOORD on that image;
* a SEG segment → TID 1411 volumetric ROI referencing the segment;
* otherwise → TID 1501 with the source images the finding lies on.

Speed: highdicom's optional image library (TID 1600) validates and copies every
listed image; for a 300-slice CT that costs seconds. The report references only the
images findings point to, and the evidence lists only those (PS3.3 C.17.2.3), so the
cost is independent of the series length (see docs/results.md for measured numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset

from models.result import Finding, InferenceResult
from node.config import NodeConfig
from node.results import codes
from node.results.common import (
    SERIES_NUMBER,
    SourceIndex,
    add_ai_equipment,
    procedure_reported,
    uid_for,
)

__all__ = ["build_sr", "encode_sr"]

_Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def _group(
    result: InferenceResult,
    finding: Finding,
    index: int,
    src: SourceIndex,
    algorithm: hd.sr.AlgorithmIdentification,
    seg: Dataset | None,
) -> tuple[_Group, list[Dataset]]:
    tracking = hd.sr.TrackingIdentifier(
        uid=uid_for(result, "tracking", index), identifier=f"{finding.label} #{index + 1}"[:64]
    )
    measurements = [
        hd.sr.Measurement(
            name=codes.PROBABILITY,
            value=round(float(finding.probability), 6),
            unit=codes.UNITLESS,
            algorithm_id=algorithm,
        )
    ]
    measurements += [
        hd.sr.Measurement(
            name=codes.to_code(m.name),
            value=float(m.value),
            unit=codes.to_code(m.unit),
            algorithm_id=algorithm,
        )
        for m in finding.measurements
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=codes.PRESENCE, value=codes.PRESENT if finding.positive else codes.ABSENT
        )
    ]
    common: dict[str, Any] = {
        "tracking_identifier": tracking,
        "finding_type": codes.to_code(finding.finding_type),
        "algorithm_id": algorithm,
        "finding_sites": (
            [hd.sr.FindingSite(codes.to_code(finding.finding_site))]
            if finding.finding_site
            else None
        ),
        "measurements": measurements,
        "qualitative_evaluations": evaluations,
    }
    if seg is not None and finding.segment_number is not None:
        ref_seg = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=finding.segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(result.series_instance_uid),
        )
        group: _Group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=ref_seg, **common
        )
        return group, [seg]
    if finding.peak is not None:
        uid, row, col = finding.peak
        image = src.get(uid)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POINT,
            # SCOORD is (column, row) with the pixel centre at +0.5 (PS3.3 C.18.6.1.1).
            graphic_data=np.array([[col + 0.5, row + 0.5]], dtype=np.float64),
            source_image=hd.sr.SourceImageForRegion(image.SOPClassUID, uid),
        )
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=region, **common
        )
        return group, [image]
    images = [src.get(u) for u in finding.source_sop_instance_uids]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID) for ds in images
        ]
        or None,
        **common,
    )
    return group, images


def encode_sr(
    result: InferenceResult,
    sources: Sequence[Dataset],
    cfg: NodeConfig,
    *,
    seg: Dataset | None = None,
) -> Dataset:
    """Build the TID 1500 Measurement Report for ``result`` (PS3.16 TID 1500).

    ``sources`` are the series' images (only those the findings refer to are read);
    ``seg`` is the SEG made from the same result, referenced by findings that carry a
    ``segment_number``. Patient, study and Specific Character Set come from the source.
    """
    return build_sr(result, SourceIndex(result, sources), cfg, seg=seg)


def build_sr(
    result: InferenceResult, src: SourceIndex, cfg: NodeConfig, *, seg: Dataset | None = None
) -> Dataset:
    """:func:`encode_sr` on an already checked :class:`SourceIndex` (used by encode_all)."""
    model = result.model
    algorithm = hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.version[:64])
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE_OBSERVER),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid,
            name=model.name[:64],
            manufacturer_name=(model.manufacturer or cfg.results.manufacturer)[:64],
            model_name=model.name[:64],
        ),
    )
    groups: list[_Group] = []
    evidence: dict[str, Dataset] = {}
    for i, finding in enumerate(result.findings):
        group, refs = _group(result, finding, i, src, algorithm, seg)
        groups.append(group)
        for ds in refs:
            evidence.setdefault(str(ds.SOPInstanceUID), ds)
    if not evidence:  # a report with no findings still records what it looked at
        evidence[str(src.first.SOPInstanceUID)] = src.first
    ordered = sorted(evidence.values(), key=lambda d: str(d.Modality) == "SEG")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported(src.first),
        imaging_measurements=groups or None,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=ordered,
        content=report[0],
        series_instance_uid=uid_for(result, "sr-series"),
        series_number=SERIES_NUMBER["sr"],
        sop_instance_uid=uid_for(result, "sr"),
        instance_number=1,
        manufacturer=cfg.results.manufacturer,
        institution_name=cfg.results.institution_name,
        is_complete=True,
        series_description=f"AI report {model.name} {model.version}"[:64],
    )
    add_ai_equipment(sr, result, cfg.results.manufacturer)
    return sr
