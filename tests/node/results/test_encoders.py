"""The SR, SC and SEG encoders: conformance (dciodvfy, dsr2html), content read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from node.config import NodeConfig, ResultsConfig
from node.results import codes, encode_all, encode_heatmap_sc, encode_seg, encode_sr
from node.results.codes import PROCESSING_ALGORITHM
from tests.dicom_checks import assert_dciodvfy_clean, dsr2html
from tests.node.results.sources import (
    classification,
    ct_series,
    ct_small,
    dx_image,
    segmentation,
)

CFG = NodeConfig()


def _save(ds: Dataset, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _ai_equipment(ds: Dataset) -> Dataset:
    items = [
        it
        for it in ds.ContributingEquipmentSequence
        if it.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM.value
    ]
    assert len(items) == 1
    item: Dataset = items[0]
    return item


@pytest.mark.integration
def test_sr_of_classification_is_valid_renders_and_reads_back(tmp_path: Path) -> None:
    dx = dx_image()
    result = classification(dx, probability=0.87)
    path = _save(encode_sr(result, [dx], CFG), tmp_path, "sr")

    assert_dciodvfy_clean(path)
    html = dsr2html(path)
    assert "Nodule" in html and "Lung structure" in html and "0.87" in html

    sr = hd.sr.srread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.StudyInstanceUID == dx.StudyInstanceUID
    assert sr.SeriesInstanceUID != dx.SeriesInstanceUID
    report: Any = sr.content
    (group,) = report.get_planar_roi_measurement_groups()
    assert group.finding_type.value == "27925004"
    assert group.finding_sites[0].value.value == "39607008"
    (prob,) = [m for m in group.get_measurements() if m.name.meaning == "Probability"]
    assert prob.value == pytest.approx(0.87)
    assert prob.unit.value == "1"
    (presence,) = group.get_qualitative_evaluations()
    assert presence.value.meaning == "Present"
    region = group.roi
    assert region is not None
    assert region.GraphicType == "POINT"
    _, row, col = result.findings[0].peak  # type: ignore[misc]
    assert list(region.GraphicData) == [col + 0.5, row + 0.5]
    ref = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == dx.SOPInstanceUID
    # Procedure reported is the imaging procedure, not the algorithm.
    proc = [it for it in sr.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert proc[0].ConceptCodeSequence[0].CodeMeaning == "Plain radiography"
    eq = _ai_equipment(sr)
    assert eq.DeviceUID == result.model.device_uid
    assert eq.ManufacturerModelName == "nodule-net" and eq.SoftwareVersions == "1.0.0"


@pytest.mark.integration
def test_segmentation_gives_aligned_seg_and_sr_that_references_it(tmp_path: Path) -> None:
    series = ct_series(n=10, size=64)
    result = segmentation(series, lesion_slices=range(3, 7))
    objects = encode_all(result, series, CFG)
    kinds = [str(o.Modality) for o in objects]
    assert kinds.count("SR") == 1 and kinds.count("SEG") == 1
    for i, obj in enumerate(objects):
        assert obj.StudyInstanceUID == series[0].StudyInstanceUID
        assert_dciodvfy_clean(_save(obj, tmp_path, f"obj{i}"))

    seg_ds = next(o for o in objects if o.Modality == "SEG")
    seg = hd.seg.segread(_save(seg_ds, tmp_path, "seg"))
    assert seg.number_of_frames == 4  # empty slices omitted
    for f, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = result.source_sop_instance_uids.index(src_uid)
        assert k in range(3, 7)
        assert np.array_equal(seg.pixel_array[f] > 0, result.mask[k] > 0)  # type: ignore[index]
    assert seg.SegmentSequence[0].SegmentLabel == "lesion"

    sr_path = _save(next(o for o in objects if o.Modality == "SR"), tmp_path, "sr")
    html = dsr2html(sr_path)
    assert "Lesion" in html
    sr = hd.sr.srread(sr_path)
    content: Any = sr.content
    (group,) = content.get_volumetric_roi_measurement_groups()
    seg_ref = group.referenced_segment
    assert seg_ref is not None
    assert seg_ref.referenced_sop_instance_uid == seg_ds.SOPInstanceUID
    assert seg_ref.referenced_segment_numbers == [1]
    (vol,) = [m for m in group.get_measurements() if m.name.value == "118565006"]
    assert vol.value == pytest.approx(result.findings[0].measurements[0].value)
    assert vol.unit.value == "mm3"


@pytest.mark.integration
@pytest.mark.parametrize("source", ["dx", "ct_small"])
def test_heatmap_sc_is_rgb_with_notice_in_source_study(tmp_path: Path, source: str) -> None:
    ds = dx_image() if source == "dx" else ct_small()
    if source == "dx":
        ds.StudyDescription = "XR CHEST PA"
        ds.BodyPartExamined = "CHEST"
    result = classification(ds)
    (sc,) = encode_heatmap_sc(result, [ds], CFG)
    path = _save(sc, tmp_path, "sc")
    assert_dciodvfy_clean(path)
    back = pydicom.dcmread(path)
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert back.BurnedInAnnotation == "YES"
    assert back.StudyInstanceUID == ds.StudyInstanceUID
    assert back.SeriesInstanceUID not in (ds.SeriesInstanceUID, "")
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert back.SeriesDate and back.SeriesTime
    if source == "dx":
        assert back.StudyDescription == "XR CHEST PA"
        assert "Laterality" not in back  # known unpaired body part, side unknown: absent
    px = back.pixel_array.astype(int)
    rows, cols = int(ds.Rows), int(ds.Columns)
    assert px.shape[1] == cols and px.shape[0] > rows  # a text band below the image
    _, row, col = result.findings[0].peak  # type: ignore[misc]
    r, g, b = px[row, col]
    assert r > g + 40 and r > b + 40  # the heatmap peak shows red
    band = px[rows:]
    yellow = (band[..., 0] > 200) & (band[..., 1] > 200) & (band[..., 2] < 80)
    assert yellow.any()  # finding text and notice in the band
    assert not ((band[..., 0] > 60) & (band[..., 2] < 30) & (band[..., 1] < 30)).all()
    image = px[:rows]
    assert np.abs(image[..., 0] - image[..., 2]).max() > 60  # colour on the image


def test_series_gets_at_most_n_most_relevant_captures() -> None:
    series = ct_series(n=6, size=32)
    res = segmentation(series, lesion_slices=range(0, 6))
    res.mask[2, :, :] = 1  # type: ignore[index]  # biggest lesion area on slice 2
    cfg = NodeConfig(results=ResultsConfig(heatmap_max_images=2))
    scs = encode_heatmap_sc(res, series, cfg)
    assert len(scs) == 2
    refs = [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in scs]
    assert series[2].SOPInstanceUID in refs
    assert len({sc.SOPInstanceUID for sc in scs}) == 2
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1
    none = encode_heatmap_sc(res, series, NodeConfig(results=ResultsConfig(heatmap_max_images=0)))
    assert none == []


def test_uids_are_deterministic_and_change_with_the_model_version() -> None:
    series = ct_series(n=4, size=32)
    first = [o.SOPInstanceUID for o in encode_all(segmentation(series), series, CFG)]
    again = [o.SOPInstanceUID for o in encode_all(segmentation(series), series, CFG)]
    assert first == again
    assert len(set(first)) == len(first)
    dx = dx_image()
    v1 = encode_sr(classification(dx, version="1.0.0"), [dx], CFG)
    v2 = encode_sr(classification(dx, version="1.1.0"), [dx], CFG)
    assert v1.SOPInstanceUID != v2.SOPInstanceUID
    assert _ai_equipment(v1).DeviceUID != _ai_equipment(v2).DeviceUID


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "charset"),
    [
        ("Müller^Jörg", "ISO_IR 100"),
        ("Müller^Jörg", "ISO_IR 192"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "ISO_IR 192"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    ],
)
def test_patient_name_and_character_set_are_copied(
    tmp_path: Path, name: str, charset: str | list[str]
) -> None:
    series = ct_series(n=4, size=32, name=name, charset=charset)  # type: ignore[arg-type]
    for i, obj in enumerate(encode_all(segmentation(series), series, CFG)):
        path = _save(obj, tmp_path, f"o{i}")
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == series[0].SpecificCharacterSet
        assert str(back.PatientName) == name
        assert back.PatientID == "PID-1"
        assert_dciodvfy_clean(path)


def test_sources_from_another_study_are_refused() -> None:
    dx, other = dx_image(), dx_image()
    with pytest.raises(ValueError, match="sources"):
        encode_sr(classification(dx), [other], CFG)
    with pytest.raises(ValueError, match="sources"):
        encode_sr(classification(dx), [], CFG)


def test_no_mask_or_empty_mask_gives_no_seg() -> None:
    dx = dx_image()
    assert encode_seg(classification(dx), [dx], CFG) is None
    series = ct_series(n=3, size=32)
    empty = segmentation(series, lesion_slices=range(0))
    assert encode_seg(empty, series, CFG) is None


def test_faint_heat_leaves_the_image_grey_and_strong_heat_colours_it() -> None:
    from node.results.sc import HEAT_FLOOR, render

    grey = np.full((64, 64), 0.5, dtype=np.float32)
    heat = np.zeros((64, 64), dtype=np.float32)
    heat[:, :16] = HEAT_FLOOR * 0.9  # faint
    heat[:, 32:40] = 1.0  # peak
    rgb = render(grey, heat, [])
    faint = rgb[40, 8].astype(int)
    assert max(faint) - min(faint) <= 2  # still grey
    hot = rgb[40, 36].astype(int)
    assert hot[0] - hot[2] > 40  # clearly red
    assert tuple(rgb[40, 32]) == (255, 255, 0)  # the hot region's outline


def test_no_colour_outside_the_body_and_the_finding_stays_visible() -> None:
    from node.results.sc import render

    yy, xx = np.mgrid[0:64, 0:64]
    body = (yy - 32) ** 2 + (xx - 32) ** 2 < 20**2
    grey = np.where(body, 0.5, 0.0).astype(np.float32)
    grey[30:34, 30:34] = 0.9  # the finding, brighter than its surroundings
    heat = np.ones((64, 64), dtype=np.float32)  # activation everywhere
    rgb = render(grey, heat, ["x"], body=body).astype(int)
    outside = rgb[:64][~body]
    assert (np.abs(outside[:, 0] - outside[:, 2]) <= 2).all()  # grey (black) outside
    # Under the strongest activation the finding is still brighter than its neighbours.
    assert rgb[32, 32].sum() > rgb[32, 40].sum()


def test_lung_findings_on_ct_get_a_lung_window() -> None:
    from node.results.common import LUNG_WINDOW, SOFT_TISSUE_WINDOW, display_window
    from tests.node.results.sources import LUNG

    ct = ct_small()
    ct.WindowCenter, ct.WindowWidth = 50, 350
    assert display_window(ct, codes.to_code(LUNG)) == LUNG_WINDOW
    liver = codes.to_code(LUNG.__class__("10200004", "SCT", "Liver structure"))
    assert display_window(ct, liver) == (50.0, 350.0)
    del ct.WindowCenter, ct.WindowWidth
    assert display_window(ct, liver) == SOFT_TISSUE_WINDOW
    dx = dx_image()
    assert display_window(dx, codes.to_code(LUNG)) is None  # a radiograph's own range
