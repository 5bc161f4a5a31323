"""Data sets: patient-level splits, DICOM folder + CSV, image folders, phantom sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file

from models.package import InputSpec
from training.datasets import (
    DatasetError,
    ct_phantom_slices,
    dicom_folder_set,
    image_folder_set,
    patient_kfold,
    patient_split,
    radiograph_phantom_set,
)

SPEC = InputSpec(size=(32, 32), channels=1, mean=[0.5], std=[0.25])


def test_patient_split_keeps_each_patient_in_one_part_and_covers_all() -> None:
    patients = [f"p{i // 3}" for i in range(60)]  # 20 patients, 3 images each
    parts = patient_split(patients, (0.6, 0.2, 0.2), seed=3)
    seen = [{patients[i] for i in part} for part in parts]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sorted(np.concatenate(parts).tolist()) == list(range(60))
    assert [len(s) for s in seen] == [12, 4, 4]
    again = patient_split(patients, (0.6, 0.2, 0.2), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_patient_kfold_validates_every_patient_once() -> None:
    patients = [f"p{i % 7}" for i in range(35)]
    folds = patient_kfold(patients, k=3, seed=0)
    val_patients = [{patients[i] for i in val} for _, val in folds]
    assert sum(len(v) for v in val_patients) == 7
    for train, val in folds:
        assert not {patients[i] for i in train} & {patients[i] for i in val}
    with pytest.raises(ValueError, match="k must be"):
        patient_kfold(patients, k=8)
    with pytest.raises(ValueError, match="fractions"):
        patient_split(patients, (0.5, 0.2))


def test_radiograph_phantom_set_is_preprocessed_with_masks_at_model_size() -> None:
    data = radiograph_phantom_set(8, 4, SPEC, native_size=64)
    assert data.images.shape == (8, 1, 32, 32) and data.images.dtype == np.float32
    assert data.masks is not None and data.masks.shape == (8, 32, 32)
    assert int(data.labels.sum()) == 4
    for i in range(8):
        assert bool(data.masks[i].any()) == bool(data.labels[i])
        assert (data.centres[i] is None) == (data.labels[i] == 0)


def test_ct_slices_group_by_volume_and_label_lesion_slices() -> None:
    spec = InputSpec(size=(32, 32), window_center=40.0, window_width=400.0)
    data = ct_phantom_slices(2, 5, spec, shape=(8, 32, 32), n_lesions=1)
    assert len(data) == 16 and len(set(data.groups)) == 2
    assert data.masks is not None
    assert np.array_equal(data.labels, data.masks.reshape(16, -1).max(1))
    # windowed C40/W400 then (x - 0) / 1: values in [0, 1]
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0


def _dicom_folder(tmp_path: Path) -> Path:
    root = tmp_path / "dicom"
    root.mkdir()
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm"]):
        ds = dcmread(str(get_testdata_file(name)))
        ds.PatientID = f"PAT{i}"
        ds.save_as(root / f"img{i}.dcm")
    (root / "notes.txt").write_text("not DICOM")
    return root


def test_dicom_folder_by_path_and_by_uid_with_masks(tmp_path: Path) -> None:
    root = _dicom_folder(tmp_path)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 255
    Image.fromarray(mask).save(root / "mask0.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label,mask\nimg0.dcm,1,mask0.png\nimg1.dcm,0,\n")
    data = dicom_folder_set(root, csv_path, SPEC)
    assert data.images.shape == (2, 1, 32, 32)
    assert data.labels.tolist() == [1, 0]
    assert data.patients == ["PAT0", "PAT1"]
    assert data.masks is not None and data.masks[0].sum() == 25 and data.masks[1].sum() == 0

    uid = str(dcmread(root / "img1.dcm").SOPInstanceUID)
    by_uid = tmp_path / "uid.csv"
    by_uid.write_text(f"sop_instance_uid,label,patient_id\n{uid},1,X\n")
    one = dicom_folder_set(root, by_uid, SPEC)
    assert len(one) == 1 and one.patients == ["X"] and one.labels.tolist() == [1]


def test_dicom_folder_reports_missing_entries_and_bad_csv(tmp_path: Path) -> None:
    root = _dicom_folder(tmp_path)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\nnope.dcm,1\n")
    with pytest.raises(DatasetError, match="not found"):
        dicom_folder_set(root, missing, SPEC)
    nokey = tmp_path / "nokey.csv"
    nokey.write_text("file,label\nimg0.dcm,1\n")
    with pytest.raises(DatasetError, match="one of path"):
        dicom_folder_set(root, nokey, SPEC)


def test_image_folder_classes_and_patients(tmp_path: Path) -> None:
    for cls, value in (("a_normal", 20), ("b_nodule", 200)):
        (tmp_path / cls).mkdir()
        for p in range(2):
            Image.fromarray(np.full((40, 50), value, np.uint8)).save(tmp_path / cls / f"P{p}_x.png")
    data = image_folder_set(tmp_path, InputSpec(size=(16, 16)))
    assert data.class_names == ["a_normal", "b_nodule"]
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.patients == ["P0", "P1", "P0", "P1"]
    assert data.images[2].mean() > data.images[0].mean()
    with pytest.raises(DatasetError, match="two class"):
        image_folder_set(tmp_path / "a_normal", InputSpec(size=(16, 16)))
