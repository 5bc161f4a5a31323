"""Source images and hand-made inference results for the result and sender tests."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from models.result import (
    MM3,
    MORPHOLOGICALLY_ABNORMAL,
    VOLUME,
    Code,
    Finding,
    InferenceResult,
    Measurement,
    ModelIdentity,
    Segment,
)

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

LESION = Code("52988006", "SCT", "Lesion")
NODULE = Code("27925004", "SCT", "Nodule")
LUNG = Code("39607008", "SCT", "Lung structure")
ABNORMAL = MORPHOLOGICALLY_ABNORMAL


def _meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _patient(ds: Dataset, name: str, charset: str) -> None:
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.PatientID = "PID-1"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""


def ct_series(
    n: int = 8,
    size: int = 64,
    *,
    name: str = "Müller^Jörg",
    charset: str = "ISO_IR 192",
    study_uid: str | None = None,
) -> list[Dataset]:
    """An axial CT series (HU with rescale), 5 mm slices, a bright sphere in the middle."""
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        sop = generate_uid()
        ds = Dataset()
        ds.file_meta = _meta(CTImageStorage, sop)
        _patient(ds, name, charset)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality, ds.Manufacturer = "CT", "Phantom"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-100.0, -100.0, 5.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [200.0 / size, 200.0 / size]
        ds.SliceThickness = 5.0
        ds.PatientPosition = "HFS"
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
        img = np.where(r2 < (size / 3) ** 2, 1024 + 40, 24).astype(np.uint16)
        img[(r2 < (size / 10) ** 2) & (abs(i - n / 2) < n / 4)] = 1024 + 200
        ds.PixelData = img.tobytes()
        out.append(ds)
    return out


def dx_image(*, name: str = "Yamada^Tarou", charset: str = "ISO_IR 192") -> Dataset:
    """A DX For Presentation image (MONOCHROME1, no patient coordinates)."""
    sop = generate_uid()
    ds = Dataset()
    ds.file_meta = _meta(DX_STORAGE, sop)
    _patient(ds, name, charset)
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Manufacturer = "DX", "Phantom"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["P", "F"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.Rows, ds.Columns = 256, 200
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", -1
    ds.ViewPosition = "PA"
    ds.PixelData = (np.arange(256 * 200, dtype=np.uint16) % 4096).tobytes()
    return ds


def ct_small() -> Dataset:
    """pydicom's bundled CT_small.dcm (a real CT slice)."""
    return pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))


def model(version: str = "1.0.0", task: str = "classification") -> ModelIdentity:
    return ModelIdentity(
        name="nodule-net",
        version=version,
        device_uid=generate_uid(entropy_srcs=["nodule-net", version]),
        task=task,  # type: ignore[arg-type]
    )


def classification(
    ds: Dataset, *, probability: float = 0.87, version: str = "1.0.0"
) -> InferenceResult:
    """A positive classification of one image with a heatmap peaking at a known pixel."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    yy, xx = np.mgrid[0:rows, 0:cols]
    peak = (rows // 3, cols // 2)
    heat = np.exp(-((yy - peak[0]) ** 2 + (xx - peak[1]) ** 2) / (2 * (rows / 10) ** 2))
    uid = str(ds.SOPInstanceUID)
    return InferenceResult(
        model=model(version),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        source_sop_instance_uids=[uid],
        findings=[
            Finding(
                label="nodule",
                finding_type=NODULE,
                probability=probability,
                threshold=0.5,
                finding_site=LUNG,
                source_sop_instance_uids=(uid,),
                peak=(uid, peak[0], peak[1]),
            )
        ],
        heatmaps={uid: heat.astype(np.float32)},
    )


def segmentation(series: list[Dataset], *, lesion_slices: range | None = None) -> InferenceResult:
    """A segmentation of ``series`` with one lesion segment on ``lesion_slices``."""
    n = len(series)
    rows, cols = int(series[0].Rows), int(series[0].Columns)
    lesion_slices = lesion_slices if lesion_slices is not None else range(n // 4, n - n // 4)
    mask = np.zeros((n, rows, cols), dtype=np.uint8)
    for i in lesion_slices:
        mask[
            i,
            rows // 2 - rows // 8 : rows // 2 + rows // 8,
            cols // 2 - cols // 8 : cols // 2 + cols // 8,
        ] = 1
    sx, sy = (float(v) for v in series[0].PixelSpacing)
    volume = float(mask.sum()) * sx * sy * float(series[0].SliceThickness)
    uids = [str(d.SOPInstanceUID) for d in series]
    return InferenceResult(
        model=model(task="segmentation"),
        study_instance_uid=str(series[0].StudyInstanceUID),
        series_instance_uid=str(series[0].SeriesInstanceUID),
        source_sop_instance_uids=uids,
        findings=[
            Finding(
                label="lesion",
                finding_type=LESION,
                probability=0.93,
                threshold=0.5,
                finding_site=LUNG,
                measurements=(Measurement(VOLUME, volume, MM3),),
                source_sop_instance_uids=tuple(uids[i] for i in lesion_slices),
                segment_number=1,
            )
        ],
        mask=mask,
        segments=[Segment(1, "lesion", ABNORMAL, LESION)],
    )
