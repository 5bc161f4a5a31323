"""Deterministic synthetic DICOM studies for tests, benchmarks and ``airnode demo``.

Nothing here is downloaded: the pixels come from :mod:`models.phantoms` (the one
module of synthetic images), and every UID derives from a
``seed`` with :func:`pydicom.uid.generate_uid` (``entropy_srcs``), so the same call
always produces the same bytes.  The data sets follow the CT Image IOD (PS3.3
A.3) and the Digital X-Ray Image IOD, For Presentation (PS3.3 A.26) closely enough
for the worker's preprocessing (rescale, windowing, orientation, spacing) to be
exercised as with real data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from models.phantoms import quick_ct_volume, quick_radiograph

__all__ = ["ct_series", "dx_image", "write_series"]

_PATIENT_NAMES = ("Doe^Jane", "Müller^Jürgen", "Ærøskøbing^Åse")


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["airnode-synthetic", str(seed), *map(str, parts)]))


def _patient(ds: Dataset, seed: int, non_ascii: bool) -> None:
    rng = np.random.default_rng(seed)
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8 (PS3.5 §6.1.2.5)
        ds.PatientName = _PATIENT_NAMES[1 + seed % 2]
    else:
        ds.PatientName = _PATIENT_NAMES[0]
    ds.PatientID = f"SYN{seed:06d}"
    ds.PatientBirthDate = f"19{40 + seed % 50:02d}{1 + seed % 12:02d}{1 + seed % 28:02d}"
    ds.PatientSex = "F" if rng.random() < 0.5 else "M"


def _chest_region(ds: Dataset) -> None:
    code = Dataset()
    code.CodeValue = "51185008"  # SNOMED CT "Thoracic structure" (CID 4031)
    code.CodingSchemeDesignator = "SCT"
    code.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = [code]


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta


def ct_series(
    n_slices: int = 300,
    rows: int = 512,
    cols: int = 512,
    volume: np.ndarray | None = None,
    *,
    seed: int = 0,
    series_number: int = 1,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slice_thickness: float = 1.0,
    non_ascii_name: bool = False,
    study_description: str = "CT CHEST",
    series_description: str = "Axial 1.0",
    body_part: str = "CHEST",
) -> list[Dataset]:
    """A CT Image Storage series, one data set per slice, feet-first ordering by z.

    ``volume`` (``(slices, rows, cols)`` in HU) overrides the phantom; its shape then
    wins over ``n_slices``/``rows``/``cols``.  Stored values are HU + 1024 with
    RescaleIntercept -1024, RescaleSlope 1 (unsigned 16-bit, as many scanners do).
    Patient, study and series UIDs depend only on ``seed`` (and ``series_number``).
    """
    if volume is None:
        volume = quick_ct_volume(n_slices, rows, cols, seed)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (slices, rows, cols), got shape {volume.shape}")
    if slice_thickness <= 0:
        raise ValueError(f"slice_thickness must be > 0, got {slice_thickness}")
    n_slices, rows, cols = (int(v) for v in volume.shape)
    stored = np.clip(np.asarray(volume, dtype=np.int32) + 1024, 0, 4095).astype(np.uint16)
    study_uid = _uid(seed, "study")
    series_uid = _uid(seed, "series", series_number)
    frame_uid = _uid(seed, "frame")
    out: list[Dataset] = []
    for k in range(n_slices):
        ds = Dataset()
        _patient(ds, seed, non_ascii_name)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = _uid(seed, "instance", series_number, k)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.AcquisitionNumber = 1
        ds.StudyDate = "20240115"
        ds.StudyTime = "101500"
        ds.SeriesDate = ds.ContentDate = ds.StudyDate
        ds.SeriesTime = ds.ContentTime = ds.StudyTime
        ds.AccessionNumber = f"ACC{seed:06d}"
        ds.StudyID = "1"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.Modality = "CT"
        ds.Manufacturer = "airnode-synthetic"
        ds.BodyPartExamined = body_part
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "FFS"
        z = -float(k) * slice_thickness
        ds.ImagePositionPatient = [
            round(-pixel_spacing[1] * (cols - 1) / 2, 4),
            round(-pixel_spacing[0] * (rows - 1) / 2, 4),
            round(z, 4),
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(z, 4)
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = slice_thickness
        ds.KVP = 120
        if body_part == "CHEST":
            _chest_region(ds)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = [40, -600]
        ds.WindowWidth = [400, 1500]
        ds.PixelData = stored[k].tobytes()
        _file_meta(ds)
        out.append(ds)
    return out


def dx_image(
    pixels: np.ndarray | None = None,
    *,
    rows: int = 1024,
    cols: int = 1024,
    seed: int = 0,
    photometric: str = "MONOCHROME2",
    pixel_spacing: tuple[float, float] = (0.3, 0.3),
    non_ascii_name: bool = False,
    body_part: str = "CHEST",
    view_position: str = "PA",
) -> Dataset:
    """A Digital X-Ray Image, For Presentation (PS3.3 A.26), 12 bits in 16.

    ``pixels`` (2-D, ``0..4095``, bright = dense) overrides the phantom.  With
    ``photometric="MONOCHROME1"`` the stored values are inverted (PS3.3 C.7.6.3.1.2),
    so a viewer that honours MONOCHROME1 shows the same picture.
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if pixels is None:
        pixels = quick_radiograph(rows, cols, seed)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {pixels.shape}")
    arr = np.clip(np.asarray(pixels), 0, 4095).astype(np.uint16)
    if photometric == "MONOCHROME1":
        arr = (4095 - arr).astype(np.uint16)
    ds = Dataset()
    _patient(ds, seed, non_ascii_name)
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = _uid(seed, "dx-instance")
    ds.StudyInstanceUID = _uid(seed, "dx-study")
    ds.SeriesInstanceUID = _uid(seed, "dx-series")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "091000"
    ds.AccessionNumber = f"DX{seed:06d}"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST"
    ds.SeriesDescription = f"Chest {view_position}"
    ds.Modality = "DX"
    ds.Manufacturer = "airnode-synthetic"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.ImageLaterality = "U"
    ds.DetectorType = "DIRECT"
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = []
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    _chest_region(ds)
    ds.PatientOrientation = ["L", "F"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = list(pixel_spacing)
    ds.PixelSpacing = list(pixel_spacing)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
    ds.PixelData = arr.tobytes()
    _file_meta(ds)
    return ds


def write_series(datasets: Sequence[Dataset], folder: Path | str) -> list[Path]:
    """Write data sets as Part 10 files ``NNNNN.dcm`` into ``folder`` (created)."""
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, ds in enumerate(datasets):
        path = out_dir / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
