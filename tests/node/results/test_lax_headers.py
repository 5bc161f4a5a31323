"""Sources that carry only what a lax modality sends still give valid results.

De-identified images and some modalities leave out Type 2 attributes (PatientBirthDate,
StudyDate, AccessionNumber…), radiographs have no Frame of Reference, and character
sets vary. Every result object must still pass dciodvfy, with the Type 2 attributes
present and empty, and the log must name the gaps without PHI.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from node.config import NodeConfig
from node.results import encode_all
from node.results.common import TYPE2_FROM_SOURCE
from tests.dicom_checks import assert_dciodvfy_clean
from tests.node.results.sources import classification, ct_series, dx_image, segmentation

pytestmark = pytest.mark.integration

#: Type 2 (and 2C/3) attributes of the sources' modules; what stays is Type 1.
NOT_TYPE1 = (
    *TYPE2_FROM_SOURCE,
    "SpecificCharacterSet",
    "SeriesNumber",
    "InstanceNumber",
    "PatientOrientation",
    "Laterality",
    "Manufacturer",
    "PositionReferenceIndicator",
    "ImagerPixelSpacing",
    "ViewPosition",
    "BurnedInAnnotation",
    "LossyImageCompression",
    "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign",
    "RescaleType",
)


def _strip(ds: Dataset, charset: str | list[str] | None, name: str | None) -> Dataset:
    for kw in NOT_TYPE1:
        if kw in ds:
            delattr(ds, kw)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    if name is not None:
        ds.PatientName = name
    return ds


CASES = [
    (None, None),  # nothing but Type 1, default repertoire
    ("ISO_IR 144", "Иванов^Иван"),  # Cyrillic
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),  # Korean, code extensions
]


@pytest.mark.parametrize(("charset", "name"), CASES, ids=["type1-only", "cyrillic", "korean"])
@pytest.mark.parametrize("modality", ["DX", "CT"])
def test_stripped_sources_give_valid_results(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    modality: str,
    charset: str | list[str] | None,
    name: str | None,
) -> None:
    if modality == "DX":
        dx = _strip(dx_image(), charset, name)
        assert "FrameOfReferenceUID" not in dx
        sources, result = [dx], classification(dx)
    else:
        sources = [_strip(d, charset, name) for d in ct_series(n=6, size=32)]
        result = segmentation(sources, lesion_slices=range(2, 4))
    with caplog.at_level(logging.WARNING, logger="node.results"):
        objects = encode_all(result, sources, NodeConfig())
    kinds = sorted(str(o.Modality) for o in objects)
    assert "SR" in kinds and "OT" in kinds and "PR" in kinds
    assert ("SEG" in kinds) == (modality == "CT")
    for i, obj in enumerate(objects):
        path = tmp_path / f"{i}.dcm"
        obj.save_as(path, enforce_file_format=True)
        assert_dciodvfy_clean(path)
        back = pydicom.dcmread(path)
        for kw in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber"):
            assert kw in back and not back[kw].value, (obj.Modality, kw)
        if name is not None:
            assert str(back.PatientName) == name  # the same text, whatever the encoding
            assert back.SpecificCharacterSet in (charset, "ISO_IR 192")
    gaps = [r.getMessage() for r in caplog.records if "Type 2" in r.getMessage()]
    if isinstance(charset, list):
        assert "ISO_IR 192" in gaps[0]
    assert len(gaps) == 1
    assert "PatientBirthDate" in gaps[0] and "AccessionNumber" in gaps[0]
    assert result.series_instance_uid not in gaps[0]
    if name is not None:
        assert name.split("^")[0] not in gaps[0]
