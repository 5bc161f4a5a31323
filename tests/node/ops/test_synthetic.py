"""The synthetic generators: deterministic, geometrically consistent, valid files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.ops.synthetic import ct_series, dx_image, write_series


def test_ct_series_is_deterministic_and_seed_dependent() -> None:
    a = ct_series(3, 32, 32, seed=7)
    b = ct_series(3, 32, 32, seed=7)
    c = ct_series(3, 32, 32, seed=8)
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert a[0].PixelData == b[0].PixelData
    assert a[0].StudyInstanceUID != c[0].StudyInstanceUID
    assert len({d.SOPInstanceUID for d in a}) == 3
    assert len({d.SeriesInstanceUID for d in a}) == 1


def test_ct_series_geometry_and_hounsfield_round_trip(tmp_path: Path) -> None:
    vol = np.arange(2 * 16 * 16, dtype=np.int16).reshape(2, 16, 16) - 500
    series = ct_series(volume=vol, slice_thickness=2.5, pixel_spacing=(0.5, 0.6))
    paths = write_series(series, tmp_path)
    read = [pydicom.dcmread(p) for p in paths]
    z = [float(d.ImagePositionPatient[2]) for d in read]
    assert z[0] - z[1] == pytest.approx(2.5)
    for k, d in enumerate(read):
        hu = d.pixel_array.astype(np.int32) * int(d.RescaleSlope) + int(d.RescaleIntercept)
        np.testing.assert_array_equal(hu, vol[k])
        assert [float(v) for v in d.PixelSpacing] == [0.5, 0.6]


def test_ct_series_rejects_bad_volume() -> None:
    with pytest.raises(ValueError, match="volume"):
        ct_series(volume=np.zeros((4, 4)))


def test_non_ascii_patient_name_survives_a_file_round_trip(tmp_path: Path) -> None:
    ds = ct_series(1, 16, 16, seed=1, non_ascii_name=True)[0]
    path = write_series([ds], tmp_path)[0]
    assert str(pydicom.dcmread(path).PatientName) == str(ds.PatientName)
    assert any(ord(ch) > 127 for ch in str(ds.PatientName))


def test_dx_monochrome1_is_the_inverse_of_monochrome2() -> None:
    m2 = dx_image(rows=32, cols=32, seed=3)
    m1 = dx_image(rows=32, cols=32, seed=3, photometric="MONOCHROME1")
    a2 = np.frombuffer(m2.PixelData, dtype=np.uint16)
    a1 = np.frombuffer(m1.PixelData, dtype=np.uint16)
    np.testing.assert_array_equal(a1, 4095 - a2)
    assert m1.PresentationLUTShape == "INVERSE"
    with pytest.raises(ValueError, match="photometric"):
        dx_image(rows=32, cols=32, photometric="RGB")


@pytest.mark.integration
def test_generated_files_pass_dciodvfy(tmp_path: Path) -> None:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy is not installed: run `bash scripts/install.sh`")
    paths = write_series([*ct_series(1, 32, 32), dx_image(rows=64, cols=64)], tmp_path)
    for path in paths:
        out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], (path.name, errors)
