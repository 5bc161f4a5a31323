"""Synthetic DICOM images and tiny model packages for the models tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
LESION = {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"}


def make_image(
    pixels: npt.NDArray[np.generic],
    z: float = 0.0,
    spacing: tuple[float, float] = (0.5, 0.5),
    study: str = "1.2.826.0.1.3680043.8.498.1",
    series: str = "1.2.826.0.1.3680043.8.498.2",
    photometric: str = "MONOCHROME2",
    instance_number: int = 1,
    geometry: bool = True,
    **extra: Any,
) -> Dataset:
    """A minimal single-frame 16-bit unsigned grey image data set."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    if geometry:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.PixelSpacing = list(spacing)
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def manifest(
    task: str = "classification",
    arch: str = "resnet18",
    size: tuple[int, int] = (64, 64),
    arch_kwargs: dict[str, Any] | None = None,
    labels: list[dict[str, Any]] | None = None,
    **input_extra: Any,
) -> dict[str, Any]:
    if labels is None:
        labels = [
            {
                "name": "nodule" if task == "classification" else "lesion",
                "code": NODULE if task == "classification" else LESION,
                "threshold": 0.5,
            }
        ]
    return {
        "model": {
            "name": f"test-{task}",
            "version": "1.0.0",
            "device_uid": "1.2.826.0.1.3680043.8.498.99",
            "task": task,
            "arch": arch,
            "arch_kwargs": arch_kwargs or {},
        },
        "input": {"size": list(size), "modalities": ["CT"], **input_extra},
        "output": {"labels": labels},
    }


def write_package_dir(path: Path, data: dict[str, Any], onnx: bool = True) -> Path:
    """A package folder without a real net (for the fake backend and manifest tests)."""
    from models.package import write_manifest

    write_manifest(path, data)
    if onnx:
        (path / "model.onnx").write_bytes(b"not used by the fake backend")
    return path
