"""Input guards: every image bundled with pydicom that a shipped model was not made for
is refused with its reason; the model's own kind of input passes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset

from models.guards import check_input
from models.package import InputSpec, load_package

REPO = Path(__file__).resolve().parents[2]

PACKAGES = {n: load_package(REPO / "models/packages" / n) for n in ("cxr-nodule", "ct-lesion")}


def _bundled() -> list[tuple[str, Dataset]]:
    out: list[tuple[str, Dataset]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the files shipped inside pydicom only (get_testdata_files would try downloads)
        root = Path(pydicom.data.__file__).parent / "test_files"
        for path in sorted(root.rglob("*.dcm")):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue
            if "Rows" in ds and "Columns" in ds:
                out.append((os.path.basename(path), ds))
    return out


BUNDLED = _bundled()


def test_there_are_many_bundled_images() -> None:
    assert len(BUNDLED) >= 40
    assert {str(ds.get("Modality", "")) for _, ds in BUNDLED} >= {"CT", "MR", "US", "NM", "OT"}


@pytest.mark.parametrize("model", sorted(PACKAGES))
def test_every_bundled_image_outside_the_model_is_refused_with_its_reason(model: str) -> None:
    manifest = PACKAGES[model].manifest
    spec = manifest.input
    for name, ds in BUNDLED:
        reasons = check_input(manifest, [ds])
        assert reasons, f"{model} would analyse {name}"
        text = "; ".join(reasons)
        modality = str(ds.get("Modality", "") or "")
        if modality.upper() not in spec.modalities:
            assert "Modality" in text, (name, text)
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            assert "Samples per Pixel" in text, (name, text)
        assert all("\n" not in r for r in reasons)


def test_the_reasons_name_what_is_wrong() -> None:
    cxr = PACKAGES["cxr-nodule"].manifest
    ct = PACKAGES["ct-lesion"].manifest
    by_name = dict(BUNDLED)
    assert any(r.startswith("Modality MR") for r in check_input(cxr, [by_name["MR_small.dcm"]]))
    assert any(
        "Photometric Interpretation" in r for r in check_input(ct, [by_name["SC_rgb_rle.dcm"]])
    )
    head = check_input(ct, [by_name["J2K_pixelrep_mismatch.dcm"]] * 3)
    assert any(r.startswith("Body Part Examined HEAD") for r in head), head
    small = check_input(ct, [by_name["CT_small.dcm"]] * 3)
    assert any("field of view" in r for r in small), small  # 128 x 0.66 mm: 85 mm
    assert any("needs at least" in r for r in check_input(ct, [by_name["CT_small.dcm"]]))
    us = check_input(cxr, [by_name["examples_ybr_color.dcm"]])
    assert any("Number of Frames 30" in r for r in us), us


def _dx(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = 2048, 2500
    ds.ImagerPixelSpacing = [0.15, 0.15]
    for k, v in overrides.items():
        setattr(ds, k, v)
    return ds


def test_the_models_own_input_passes_and_each_guard_bites() -> None:
    cxr = PACKAGES["cxr-nodule"].manifest
    assert check_input(cxr, [_dx()]) == []
    assert check_input(cxr, [_dx(BodyPartExamined="")]) == []  # absent: not a reason
    assert check_input(cxr, [_dx(BodyPartExamined="KNEE")])
    assert check_input(cxr, [_dx(Rows=128)])
    assert check_input(cxr, [_dx(ImagerPixelSpacing=[3.0, 3.0])])
    assert check_input(cxr, [_dx(NumberOfFrames=4)])
    assert check_input(cxr, [_dx(Modality="MG")])
    no_spacing = _dx()
    del no_spacing.ImagerPixelSpacing
    assert any("Pixel Spacing" in r for r in check_input(cxr, [no_spacing]))
    assert check_input(cxr, []) == ["the series has no images"]


def test_an_undeclared_guard_checks_nothing() -> None:
    spec = InputSpec(size=(64, 64))
    ds = Dataset()
    ds.Modality = "US"
    ds.SamplesPerPixel = 3
    assert check_input(spec, [ds]) == []
