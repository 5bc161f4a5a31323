"""Our results as the readers radiologists' viewers use see them.

The demo studies (a DX with a nodule, a CT with a lesion) go through the shipped
models; the SR and SEG are then loaded with dcmjs and the Cornerstone adapters (what
OHIF runs, headless in Node) and with highdicom's readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset

from models.result import InferenceResult
from node.config import NodeConfig
from node.results import encode_all
from node.results.geometry import key_slice
from tests.dicom_checks import assert_dciodvfy_clean, cornerstone_load, dsr2html

CFG = NodeConfig()
PACKAGES = Path(__file__).resolve().parents[3] / "models" / "packages"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo() -> dict[str, tuple[InferenceResult, list[Dataset], list[Dataset]]]:
    """``modality → (result, source images, result objects)`` for the demo DX and CT."""
    from models.package import load_package
    from models.pipeline import Predictor
    from node.ops.demo import demo_studies

    out = {}
    for modality, _lesion, sources in demo_studies(dx=1, ct=1, slices=32, ct_size=128, dx_size=256):
        pkg = "cxr-nodule" if modality == "DX" else "ct-lesion"
        result = Predictor(load_package(PACKAGES / pkg), "onnxruntime").predict(sources)
        out[modality] = (result, sources, encode_all(result, sources, CFG))
    return out


def _write(tmp_path: Path, sources: list[Dataset], objects: list[Dataset]) -> dict[str, Any]:
    images = []
    for i, ds in enumerate(sources):
        images.append(tmp_path / f"img{i:03d}.dcm")
        ds.save_as(images[-1], enforce_file_format=True)
    paths: dict[str, Any] = {"images": images}
    for obj in objects:
        kind = str(obj.Modality).lower()
        if kind in paths:
            continue
        paths[kind] = tmp_path / f"{kind}.dcm"
        obj.save_as(paths[kind], enforce_file_format=True)
    return paths


def test_cornerstone_loads_the_dx_finding_at_its_peak(demo: Any, tmp_path: Path) -> None:
    result, sources, objects = demo["DX"]
    paths = _write(tmp_path, sources, objects)
    loaded = cornerstone_load(paths["sr"], paths["images"])
    assert loaded["warnings"] == []
    (finding,) = result.findings
    (m,) = loaded["measurements"]
    assert m["toolType"] == "Probe"
    assert m["sopInstanceUID"] == sources[0].SOPInstanceUID and m["imageIndex"] == 0
    assert m["finding"] == "Nodule" and m["findingSites"] == ["Lung structure"]
    _, row, col = finding.peak
    ((x, y),) = m["imagePoints"]
    assert (x, y) == pytest.approx((col + 0.5, row + 0.5), abs=1e-3)


def test_cornerstone_loads_the_ct_outline_and_the_seg_where_the_lesion_is(
    demo: Any, tmp_path: Path
) -> None:
    result, sources, objects = demo["CT"]
    assert result.mask is not None and (result.mask > 0).any()
    paths = _write(tmp_path, sources, objects)
    loaded = cornerstone_load(paths["sr"], paths["images"], paths["seg"])
    assert len(result.findings) == 1
    k = key_slice(result.mask, 1)
    assert k is not None
    outlines = [m for m in loaded["measurements"] if m["toolType"] == "PlanarFreehandROI"]
    assert len(outlines) == 1
    m = outlines[0]
    # The mask is in sorted (result) order; the files in the order the series came.
    position = {str(ds.SOPInstanceUID): i for i, ds in enumerate(sources)}
    key_uid = result.source_sop_instance_uids[k]
    assert m["sopInstanceUID"] == key_uid and m["imageIndex"] == position[key_uid]
    assert m["finding"] == "Lesion" and m["findingSites"]
    pts = np.array(m["imagePoints"])
    assert len(pts) >= 4
    # The outline encloses the lesion: every lesion pixel centre of the key slice lies
    # within its bounding box, which is no bigger than the lesion's by more than a pixel.
    rows, cols = np.nonzero(result.mask[k] == 1)
    assert pts[:, 0].min() == pytest.approx(cols.min(), abs=1e-3)
    assert pts[:, 0].max() == pytest.approx(cols.max() + 1, abs=1e-3)
    assert pts[:, 1].min() == pytest.approx(rows.min(), abs=1e-3)
    assert pts[:, 1].max() == pytest.approx(rows.max() + 1, abs=1e-3)
    # Only the volumetric group (a SEG reference; no tool draws it) is left out.
    assert len(loaded["warnings"]) <= len(result.findings)

    seg = loaded["seg"]
    assert seg is not None and list(seg["segments"]) == ["1"]
    slices = {int(i): n for i, n in seg["segments"]["1"]["slices"].items()}
    expected = {
        position[result.source_sop_instance_uids[i]]: int((result.mask[i] == 1).sum())
        for i in np.flatnonzero(result.mask.any(axis=(1, 2)))
    }
    assert slices == expected


@pytest.mark.parametrize("modality", ["DX", "CT"])
def test_highdicom_finds_type_site_probability_geometry_and_images(
    demo: Any, tmp_path: Path, modality: str
) -> None:
    result, sources, objects = demo[modality]
    paths = _write(tmp_path, sources, objects)
    assert_dciodvfy_clean(paths["sr"])
    (finding,) = result.findings
    html = dsr2html(paths["sr"])
    assert finding.finding_type.meaning in html and "Image Library" in html
    sr = hd.sr.srread(paths["sr"])
    content: Any = sr.content
    (planar,) = content.get_planar_roi_measurement_groups()
    assert planar.finding_type.value == finding.finding_type.value
    assert planar.finding_sites and planar.finding_sites[0].value.value
    (prob,) = [m for m in planar.get_measurements() if m.name.meaning == "Probability"]
    assert prob.value == pytest.approx(finding.probability, abs=1e-6)
    (presence,) = planar.get_qualitative_evaluations()
    assert presence.value.meaning == ("Present" if finding.positive else "Absent")
    assert planar.tracking_uid and planar.tracking_identifier
    region = planar.roi
    assert region is not None
    image_uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    # Image library (TID 1600) and evidence name exactly the images findings are drawn on.
    library = [
        it.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for c in sr.ContentSequence
        if c.ConceptNameCodeSequence[0].CodeValue == "111028"
        for grp in c.ContentSequence
        for it in [grp]
        if it.ValueType == "IMAGE"
    ] or [
        it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for c in sr.ContentSequence
        if c.ConceptNameCodeSequence[0].CodeValue == "111028"
        for grp in c.ContentSequence
        for it in grp.ContentSequence
        if it.ValueType == "IMAGE"
    ]
    assert library == [image_uid]
    evidence = {
        i.ReferencedSOPInstanceUID
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert image_uid in evidence
    if modality == "DX":
        assert region.GraphicType == "POINT"
        assert image_uid == finding.peak[0]
        return
    assert region.GraphicType == "POLYLINE"
    k = key_slice(result.mask, 1)
    assert image_uid == result.source_sop_instance_uids[k]
    (volumetric,) = content.get_volumetric_roi_measurement_groups()
    assert volumetric.tracking_uid == planar.tracking_uid
    assert volumetric.finding_sites and volumetric.finding_type.value == "52988006"
    (vol,) = [m for m in volumetric.get_measurements() if m.name.value == "118565006"]
    seg_ds = next(o for o in objects if o.Modality == "SEG")
    assert volumetric.referenced_segment.referenced_sop_instance_uid == seg_ds.SOPInstanceUID
    assert seg_ds.SOPInstanceUID in evidence
    seg = hd.seg.segread(paths["seg"])
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    voxel = float(measures.PixelSpacing[0]) * float(measures.PixelSpacing[1])
    voxel *= float(measures.get("SpacingBetweenSlices") or measures.SliceThickness)
    assert vol.value == pytest.approx(int((seg.pixel_array > 0).sum()) * voxel, rel=1e-6)
    assert vol.unit.value == "mm3"
