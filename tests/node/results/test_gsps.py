"""The Grayscale Softcopy Presentation State: findings drawn on the original images.

DCMTK's ``dcmp2pgm`` applies the presentation state to its image, as a viewer does,
and reports the annotations and the window it used.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.config import NodeConfig
from node.results import encode_gsps
from node.results.common import LUNG_WINDOW
from node.results.geometry import key_slice
from tests.conftest import require_tool
from tests.dicom_checks import assert_dciodvfy_clean
from tests.node.results.sources import classification, ct_series, dx_image, segmentation

pytestmark = pytest.mark.integration


def _render(tmp_path: Path, pr_path: Path, image: pydicom.Dataset) -> tuple[str, np.ndarray]:
    """``dcmp2pgm -v -p PR IMAGE OUT``: its report and the rendered bitmap."""
    img = tmp_path / "image.dcm"
    image.save_as(img, enforce_file_format=True)
    out = tmp_path / "out.pgm"
    proc = subprocess.run(
        [require_tool("dcmp2pgm"), "-v", "-p", str(pr_path), str(img), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = out.read_bytes()
    fields = raw.split(maxsplit=4)  # P5, width, height, maxval, data
    assert fields[0] == b"P5" and fields[3] == b"255"
    width, height = int(fields[1]), int(fields[2])
    pixels = np.frombuffer(raw[-width * height :], dtype=np.uint8).reshape(height, width)
    return proc.stdout + proc.stderr, pixels


def test_dx_gsps_marks_the_peak_with_text_and_renders(tmp_path: Path) -> None:
    dx = dx_image()
    result = classification(dx, probability=0.87)
    pr = encode_gsps(result, [dx], NodeConfig())
    assert pr is not None
    path = tmp_path / "pr.dcm"
    pr.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    assert back.StudyInstanceUID == dx.StudyInstanceUID
    assert back.SeriesInstanceUID != dx.SeriesInstanceUID
    (ann,) = back.GraphicAnnotationSequence
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == dx.SOPInstanceUID
    report, pixels = _render(tmp_path, path, dx)
    assert "Nodule p=0.87 (positive)" in report
    assert "type=polyline" in report
    assert pixels.shape == (dx.Rows, dx.Columns)
    # The hot-region outline surrounds the peak; the cross is centred on it.
    _, row, col = result.findings[0].peak  # type: ignore[misc]
    outline = np.array(ann.GraphicObjectSequence[0].GraphicData).reshape(-1, 2)
    assert outline[:, 0].min() < col + 0.5 < outline[:, 0].max()
    assert outline[:, 1].min() < row + 0.5 < outline[:, 1].max()
    cross = np.array(ann.GraphicObjectSequence[1].GraphicData).reshape(-1, 2)
    assert cross.mean(axis=0) == pytest.approx((col + 0.5, row + 0.5))


def test_ct_gsps_outlines_the_lesion_in_a_lung_window(tmp_path: Path) -> None:
    series = ct_series(n=8, size=64)
    result = segmentation(series, lesion_slices=range(2, 6))
    pr = encode_gsps(result, series, NodeConfig())
    assert pr is not None
    path = tmp_path / "pr.dcm"
    pr.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    back = pydicom.dcmread(path)
    (ann,) = back.GraphicAnnotationSequence
    k = key_slice(result.mask, 1)  # type: ignore[arg-type]
    key = series[k]  # type: ignore[index]
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
    voi = back.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == LUNG_WINDOW  # lung finding
    report, pixels = _render(tmp_path, path, key)
    assert "Lesion p=0.93 (positive)" in report
    assert "VOI transformation: window center=-600 width=1500" in report
    assert pixels.shape == (key.Rows, key.Columns) and pixels.max() > pixels.min()
    outline = np.array(ann.GraphicObjectSequence[0].GraphicData).reshape(-1, 2)
    rows, cols = np.nonzero(result.mask[k] == 1)  # type: ignore[index]
    assert outline[:, 0].min() == cols.min() and outline[:, 0].max() == cols.max() + 1
    assert outline[:, 1].min() == rows.min() and outline[:, 1].max() == rows.max() + 1
