"""Comprehensive 3D SR, TID 1500 Measurement Report, following the IHE AI Results profile.

One measurement group per finding carries a tracking identifier and UID, the finding
type and site, the probability (a numeric measurement, UCUM "1"), the presence at the
operating threshold (a qualitative evaluation) and its geometry, laid out so that the
readers OHIF uses (dcmjs and the Cornerstone adapters) place it on the image:

* a segmented lesion → a TID 1410 planar ROI on its key slice (the slice where it is
  largest) with the lesion's outline as a closed SCOORD POLYLINE on that image, and a
  TID 1411 volumetric ROI with the volume and the SEG segment reference;
* a heatmap peak → a TID 1410 planar ROI with a POINT SCOORD on that image;
* otherwise → TID 1501 with the source images the finding lies on.

The Cornerstone adapters look for the SCOORD under the group's *first* NUM (TID 300
allows a SCOORD there by INFERRED FROM, row 12 of TID 300 via TID 320) and pick the
tool that draws it from the Tracking Identifier text ("Cornerstone3DTools@^0.1.0:
PlanarFreehandROI" for an outline, the convention OHIF writes itself) or from the
graphic type (a POINT becomes a Probe). So each planar group repeats its region under
its first NUM, and its tracking identifier starts with the tool name, then names the
finding.

The TID 1600 Image Library and the evidence list only the images the findings point
to (PS3.3 C.17.2.3): listing every slice of a 300-slice CT costs seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    finding_site,
    procedure_reported,
    uid_for,
)
from node.results.geometry import key_slice, outline, polygon_area

__all__ = ["TOOL_TAG", "Predecessor", "build_sr", "encode_sr"]

#: Prefix of the tracking identifiers the Cornerstone3D adapters map to their tools.
TOOL_TAG = "Cornerstone3DTools@^0.1.0"

_Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


@dataclass(frozen=True)
class Predecessor:
    """An earlier SR this one replaces (PS3.3 C.17.2.2 Predecessor Documents Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def as_dataset(self) -> Dataset:
        ds = Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds


def _region_under(
    measurement: hd.sr.Measurement, graphic_type: str, points: np.ndarray, image: Dataset
) -> None:
    """Repeat the group's region under ``measurement`` (INFERRED FROM, TID 300 / TID 320).

    Called after the group is built: highdicom keeps TID 1410 measurements free of
    their own coordinates, but the Cornerstone adapters read the region only there.
    """
    measurement[0].ContentSequence.append(
        hd.sr.CoordinatesForMeasurement(
            graphic_type=graphic_type,
            graphic_data=points,
            source_image=hd.sr.SourceImageForRegion(
                str(image.SOPClassUID), str(image.SOPInstanceUID)
            ),
        )
    )


#: What highdicom's TID 1602 descriptors read, by kind of image.
_DESCRIPTORS = {
    "projection": ("PatientOrientation", "ImagerPixelSpacing"),
    "cross": ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness"),
}
_PROJECTION = {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"}


def _library_entry(image: Dataset) -> Dataset:
    """``image`` as the TID 1600 library describes it.

    An image without the attributes its modality's TID 1602 descriptors need (a CR with
    no Imager Pixel Spacing, a radiograph with an empty Patient Orientation) is listed
    with modality, size and frame of reference only, instead of failing the report.
    """
    modality = str(image.get("Modality", ""))
    kind = (
        "projection"
        if modality in _PROJECTION
        else "cross"
        if modality in ("CT", "MR", "PT")
        else ""
    )
    needed = _DESCRIPTORS.get(kind, ())
    complete = all(image.get(k) not in (None, "") for k in needed)
    if complete and kind == "projection":
        po = image.get("PatientOrientation")
        complete = po is not None and len(po) == 2 and all(po)
    if complete:
        return image
    view = Dataset()
    for kw in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if kw in image:
            setattr(view, kw, image.get(kw))
    view.Modality = ""  # no modality-specific descriptors
    return view


def _spacing(image: Dataset) -> tuple[float, float] | None:
    spacing = image.get("PixelSpacing") or image.get("ImagerPixelSpacing")
    if not spacing or len(spacing) != 2:
        return None
    return float(spacing[0]), float(spacing[1])


def _groups(
    result: InferenceResult,
    finding: Finding,
    index: int,
    src: SourceIndex,
    algorithm: hd.sr.AlgorithmIdentification,
    seg: Dataset | None,
) -> tuple[list[_Group], list[Dataset]]:
    """The measurement group(s) of one finding and the images they reference."""
    name = f"{finding.label} #{index + 1}"
    uid = uid_for(result, "tracking", index)

    def tracking(tool: str | None) -> hd.sr.TrackingIdentifier:
        text = f"{TOOL_TAG}:{tool}:{name}" if tool else name
        return hd.sr.TrackingIdentifier(uid=uid, identifier=text[:64])

    def probability() -> hd.sr.Measurement:
        return hd.sr.Measurement(
            name=codes.PROBABILITY,
            value=round(float(finding.probability), 6),
            unit=codes.UNITLESS,
            algorithm_id=algorithm,
        )

    others = [
        hd.sr.Measurement(
            name=codes.to_code(m.name),
            value=float(m.value),
            unit=codes.to_code(m.unit),
            algorithm_id=algorithm,
        )
        for m in finding.measurements
    ]
    site = finding_site(
        codes.to_code(finding.finding_site) if finding.finding_site else None, src.first
    )
    common: dict[str, Any] = {
        "finding_type": codes.to_code(finding.finding_type),
        "algorithm_id": algorithm,
        "finding_sites": [hd.sr.FindingSite(site)] if site is not None else None,
        "qualitative_evaluations": [
            hd.sr.QualitativeEvaluation(
                name=codes.PRESENCE, value=codes.PRESENT if finding.positive else codes.ABSENT
            )
        ],
    }
    label = finding.segment_number
    k = key_slice(result.mask, label) if result.mask is not None and label is not None else None
    if k is not None and label is not None and result.mask is not None:
        image = src.ordered[k]
        points = outline(result.mask[k] == label)
        planar: list[hd.sr.Measurement] = []
        spacing = _spacing(image)
        if spacing is not None:
            area = abs(polygon_area(points)) * spacing[0] * spacing[1]
            planar.append(
                hd.sr.Measurement(
                    name=codes.AREA, value=round(area, 3), unit=codes.MM2, algorithm_id=algorithm
                )
            )
        planar.append(probability())
        groups: list[_Group] = [
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking("PlanarFreehandROI"),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=points,
                    source_image=hd.sr.SourceImageForRegion(
                        str(image.SOPClassUID), str(image.SOPInstanceUID)
                    ),
                ),
                measurements=planar,
                **common,
            )
        ]
        _region_under(planar[0], "POLYLINE", points, image)
        refs = [image]
        if seg is not None:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking(None),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=seg.SOPClassUID,
                        sop_instance_uid=seg.SOPInstanceUID,
                        segment_number=label,
                        source_series=hd.sr.SourceSeriesForSegmentation(result.series_instance_uid),
                    ),
                    measurements=[probability(), *others],
                    **common,
                )
            )
            refs.append(seg)
        return groups, refs
    if finding.peak is not None:
        peak_uid, row, col = finding.peak
        image = src.get(peak_uid)
        point = np.array([[col + 0.5, row + 0.5]], dtype=np.float64)
        measurements = [probability(), *others]
        group: _Group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking("Probe"),
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POINT,
                # SCOORD is (column, row) with the pixel centre at +0.5 (PS3.3 C.18.6.1.1).
                graphic_data=point,
                source_image=hd.sr.SourceImageForRegion(str(image.SOPClassUID), peak_uid),
            ),
            measurements=measurements,
            **common,
        )
        _region_under(measurements[0], "POINT", point, image)
        return [group], [image]
    images = [src.get(u) for u in finding.source_sop_instance_uids]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(None),
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID) for ds in images
        ]
        or None,
        measurements=[probability(), *others],
        **common,
    )
    return [group], images


def encode_sr(
    result: InferenceResult,
    sources: Sequence[Dataset],
    cfg: NodeConfig,
    *,
    seg: Dataset | None = None,
    predecessor: Predecessor | None = None,
) -> Dataset:
    """Build the TID 1500 Measurement Report for ``result`` (PS3.16 TID 1500).

    ``sources`` are the series' images (only those the findings refer to are read);
    ``seg`` is the SEG made from the same result, referenced by findings that carry a
    ``segment_number``. Patient, study and Specific Character Set come from the source.
    ``predecessor`` is the earlier SR of the same result series that this one replaces
    (made from different input); it goes into Predecessor Documents Sequence.
    """
    return build_sr(result, SourceIndex(result, sources), cfg, seg=seg, predecessor=predecessor)


def build_sr(
    result: InferenceResult,
    src: SourceIndex,
    cfg: NodeConfig,
    *,
    seg: Dataset | None = None,
    predecessor: Predecessor | None = None,
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
        made, refs = _groups(result, finding, i, src, algorithm, seg)
        groups.extend(made)
        for ds in refs:
            evidence.setdefault(str(ds.SOPInstanceUID), ds)
    if not evidence:  # a report with no findings still records what it looked at
        evidence[str(src.first.SOPInstanceUID)] = src.first
    ordered = sorted(evidence.values(), key=lambda d: str(d.Modality) == "SEG")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported(src.first),
        imaging_measurements=groups or None,
        # TID 1600: the images the findings are drawn on (older OHIF needs the library).
        referenced_images=[_library_entry(d) for d in ordered if str(d.Modality) != "SEG"]
        or [_library_entry(src.first)],
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
        previous_versions=[predecessor.as_dataset()] if predecessor is not None else None,
        series_description=f"AI report {model.name} {model.version}"[:64],
    )
    add_ai_equipment(sr, result, cfg.results.manufacturer)
    return sr
