"""Data sets for training and evaluation, preprocessed exactly as the node serves.

Three sources, one in-memory result (:class:`ArraySet`: model-ready float32 inputs,
labels, optional masks at model resolution, and the patient of every sample):

* :func:`dicom_folder_set` — a folder of DICOM files plus a labels CSV that names each
  image by file path or SOP / Series / Study Instance UID (optional mask files);
* :func:`image_folder_set` — PNG/JPEG images in one sub-folder per class;
* :func:`radiograph_phantom_set`, :func:`ct_phantom_slices` — the synthetic phantoms
  of :mod:`models.phantoms`, with exact ground truth.

Every pixel goes through :func:`models.preprocess.preprocess_frame` (modality LUT, VOI
window, MONOCHROME1 inversion, resampling, normalisation) with the model's
:class:`models.package.InputSpec`, so training and serving see identical inputs.

Splits are by patient: :func:`patient_split` and :func:`patient_kfold` never put one
patient in two parts (images of one patient are correlated; splitting them leaks).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from models.package import InputSpec
from models.phantoms import (
    CT_RESCALE_INTERCEPT,
    CT_RESCALE_SLOPE,
    ct_phantoms,
    radiograph_phantoms,
)
from models.preprocess import SpatialMap, decode_frames

__all__ = [
    "ArraySet",
    "DatasetError",
    "ct_phantom_slices",
    "dicom_folder_set",
    "image_folder_set",
    "patient_kfold",
    "patient_split",
    "radiograph_phantom_set",
    "random_ct_slice_set",
    "random_radiograph_set",
]

F32 = npt.NDArray[np.float32]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A data set cannot be built (missing file, bad CSV row, unknown UID); one line."""


@dataclass
class ArraySet:
    """Model-ready samples.

    ``images``: ``(N, C, h, w)`` float32; ``labels``: ``(N,)`` int64 (class index);
    ``masks``: ``(N, h, w)`` uint8 or None; ``patients``: ``N`` patient ids;
    ``groups``: ``N`` case ids (the volume a CT slice came from; else the sample id);
    ``centres``: per sample, the lesion centre in model pixels (or None).
    """

    images: F32
    labels: npt.NDArray[np.int64]
    patients: list[str]
    masks: npt.NDArray[np.uint8] | None = None
    groups: list[str] = field(default_factory=list)
    centres: list[tuple[float, float] | None] = field(default_factory=list)
    class_names: list[str] = field(default_factory=lambda: ["negative", "positive"])

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4:
            raise DatasetError(f"images must be (N, C, h, w), got shape {self.images.shape}")
        if len(self.labels) != n or len(self.patients) != n:
            raise DatasetError(
                f"{n} images but {len(self.labels)} labels and {len(self.patients)} patients"
            )
        if self.masks is not None and self.masks.shape != (n, *self.images.shape[2:]):
            raise DatasetError(f"masks shape {self.masks.shape} does not match the images")
        if not self.groups:
            self.groups = [f"{p}#{i}" for i, p in enumerate(self.patients)]
        if not self.centres:
            self.centres = [None] * n

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: Sequence[int] | npt.NDArray[np.integer]) -> ArraySet:
        ix = np.asarray(idx, dtype=np.int64)
        return ArraySet(
            images=self.images[ix],
            labels=self.labels[ix],
            patients=[self.patients[i] for i in ix],
            masks=None if self.masks is None else self.masks[ix],
            groups=[self.groups[i] for i in ix],
            centres=[self.centres[i] for i in ix],
            class_names=list(self.class_names),
        )


def _pseudo_dataset(
    photometric: str = "MONOCHROME2", slope: float = 1.0, intercept: float = 0.0
) -> Dataset:
    """The few attributes the preprocessing reads, for pixels that come without DICOM."""
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    return ds


def _prepare(frame: npt.NDArray[np.generic], ds: Dataset, spec: InputSpec) -> F32:
    arr, _ = spec.prepare(frame, ds)
    return arr


def _mask_to_model(mask: npt.NDArray[np.generic], size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    smap = SpatialMap((int(mask.shape[0]), int(mask.shape[1])), (int(size[0]), int(size[1])))
    return np.asarray(smap.forward(mask.astype(np.float32), "nearest") > 0.5, dtype=np.uint8)


# ------------------------------------------------------------------------ phantoms


def radiograph_phantom_set(
    n: int, seed: int, spec: InputSpec, *, native_size: int = 256, **phantom_kwargs: object
) -> ArraySet:
    """``n`` radiograph phantoms (half positive), preprocessed with ``spec``."""
    ds = _pseudo_dataset()
    images, labels, masks, patients, centres = [], [], [], [], []
    smap = SpatialMap((native_size, native_size), (int(spec.size[0]), int(spec.size[1])))
    for p in radiograph_phantoms(n, seed, size=native_size, **phantom_kwargs):  # type: ignore[arg-type]
        images.append(_prepare(p.image, ds, spec))
        labels.append(p.label)
        masks.append(_mask_to_model(p.mask, spec.size))
        patients.append(p.patient_id)
        centres.append(None if p.centre is None else smap.forward_point(*p.centre))
    return ArraySet(
        images=np.stack(images).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        patients=patients,
        masks=np.stack(masks),
        centres=centres,
        class_names=["no nodule", "nodule"],
    )


def ct_phantom_slices(
    n_volumes: int,
    seed: int,
    spec: InputSpec,
    *,
    shape: tuple[int, int, int] = (24, 128, 128),
    **phantom_kwargs: object,
) -> ArraySet:
    """Every axial slice of ``n_volumes`` CT phantoms, for slice-wise segmentation.

    ``labels`` says whether the slice shows lesion; ``groups`` names the volume, so
    evaluation can compute Dice per case (per volume).
    """
    ds = _pseudo_dataset(slope=CT_RESCALE_SLOPE, intercept=CT_RESCALE_INTERCEPT)
    images, masks, patients, groups = [], [], [], []
    for v in ct_phantoms(n_volumes, seed, shape=shape, **phantom_kwargs):
        for z in range(v.stored.shape[0]):
            images.append(_prepare(v.stored[z], ds, spec))
            masks.append(_mask_to_model(v.mask[z], spec.size))
            patients.append(v.patient_id)
            groups.append(v.patient_id)
    m = np.stack(masks)
    return ArraySet(
        images=np.stack(images).astype(np.float32),
        labels=(m.reshape(len(m), -1).max(axis=1) > 0).astype(np.int64),
        patients=patients,
        masks=m,
        groups=groups,
        class_names=["background", "lesion"],
    )


def random_radiograph_set(n: int, seed: int, spec: InputSpec) -> ArraySet:
    """``n`` domain-randomised radiographs (:mod:`training.randomised`), half positive."""
    from training.randomised import random_radiograph

    rng = np.random.default_rng(seed)
    labels_all = np.array([1] * (n // 2) + [0] * (n - n // 2), dtype=bool)
    rng.shuffle(labels_all)
    images, labels, masks, patients, centres = [], [], [], [], []
    for i in range(n):
        r = random_radiograph(rng, nodule=bool(labels_all[i]))
        x, smap = spec.prepare(r.stored, r.header)
        images.append(x)
        labels.append(r.label)
        masks.append(_mask_to_model(r.mask, spec.size))
        patients.append(f"R{seed}-{i:05d}")
        centres.append(None if r.centre is None else smap.forward_point(*r.centre))
    return ArraySet(
        images=np.stack(images).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        patients=patients,
        masks=np.stack(masks),
        centres=centres,
        class_names=["no nodule", "nodule"],
    )


def random_ct_slice_set(n: int, seed: int, spec: InputSpec) -> ArraySet:
    """``n`` domain-randomised CT slices (:mod:`training.randomised`); 0-3 lesions each."""
    from training.randomised import random_ct_slice

    rng = np.random.default_rng(seed)
    images, masks, patients = [], [], []
    for i in range(n):
        s = random_ct_slice(rng, n_lesions=int(rng.choice([0, 1, 1, 2, 3])))
        x, _ = spec.prepare(s.stored, s.header)
        images.append(x)
        masks.append(_mask_to_model(s.mask, spec.size))
        patients.append(f"C{seed}-{i:05d}")
    m = np.stack(masks)
    return ArraySet(
        images=np.stack(images).astype(np.float32),
        labels=(m.reshape(len(m), -1).max(axis=1) > 0).astype(np.int64),
        patients=patients,
        masks=m,
        class_names=["background", "lesion"],
    )


# ---------------------------------------------------------------------- DICOM folders

_KEYS = ("path", "sop_instance_uid", "series_instance_uid", "study_instance_uid")


def _read_mask_file(path: Path) -> npt.NDArray[np.uint8]:
    if path.suffix == ".npy":
        return np.asarray(np.load(path) > 0, dtype=np.uint8)
    from PIL import Image

    with Image.open(path) as im:
        return (np.asarray(im.convert("L")) > 0).astype(np.uint8)


def dicom_folder_set(root: str | Path, labels_csv: str | Path, spec: InputSpec) -> ArraySet:
    """DICOM files under ``root`` labelled by a CSV.

    The CSV has a ``label`` column (integer class) and one key column: ``path``
    (relative to ``root``), ``sop_instance_uid``, ``series_instance_uid`` or
    ``study_instance_uid`` (a series/study label applies to all its images).
    Optional columns: ``mask`` (a PNG or ``.npy`` file relative to ``root``, same
    rows/columns as the image) and ``patient_id`` (else the file's PatientID).
    Multi-frame images contribute one sample per frame.  Files that are not DICOM or
    not named in the CSV are skipped.
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"DICOM folder {base} does not exist")
    rows = _read_csv(Path(labels_csv))
    key = next((k for k in _KEYS if k in rows[0]), None)
    if key is None:
        raise DatasetError(f"{labels_csv}: needs a label column and one of {', '.join(_KEYS)}")
    table = {r[key].strip(): r for r in rows}
    images, labels, masks, patients = [], [], [], []
    have_masks = "mask" in rows[0]
    used: set[str] = set()
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError):
            continue
        ident = {
            "path": path.relative_to(base).as_posix(),
            "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
            "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        }[key]
        row = table.get(ident)
        if row is None:
            continue
        used.add(ident)
        frames = decode_frames(ds)
        mask_full = None
        if have_masks and row.get("mask"):
            mask_full = _read_mask_file(base / row["mask"])
        for frame in frames:
            images.append(_prepare(frame, ds, spec))
            labels.append(_int_label(row, labels_csv))
            patients.append(row.get("patient_id") or str(ds.get("PatientID", "")) or ident)
            if have_masks:
                m = mask_full if mask_full is not None else np.zeros(frame.shape[:2], np.uint8)
                masks.append(_mask_to_model(m, spec.size))
    missing = sorted(set(table) - used)
    if missing:
        raise DatasetError(f"{labels_csv}: {len(missing)} entries not found, e.g. {missing[0]!r}")
    return ArraySet(
        images=np.stack(images).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        patients=patients,
        masks=np.stack(masks) if have_masks else None,
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"labels CSV {path} does not exist")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [{k.strip().lower(): (v or "") for k, v in r.items()} for r in csv.DictReader(fh)]
    if not rows or "label" not in rows[0]:
        raise DatasetError(f"{path}: needs a header with a label column and at least one row")
    return rows


def _int_label(row: dict[str, str], source: str | Path) -> int:
    try:
        return int(row["label"])
    except ValueError:
        raise DatasetError(f"{source}: label {row['label']!r} is not an integer") from None


# ---------------------------------------------------------------------- image folders


def image_folder_set(root: str | Path, spec: InputSpec) -> ArraySet:
    """``root/<class>/<patient>_<anything>.png``: one sub-folder per class, sorted by name.

    Images are read with Pillow as 8-bit grey (RGB when ``spec.channels == 3``), scaled
    to [0, 1] and resampled/normalised like DICOM pixels.  The patient is the part of
    the file name before the first underscore (the whole stem if there is none).
    """
    from PIL import Image

    base = Path(root)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if len(classes) < 2:
        raise DatasetError(f"image folder {base} needs at least two class sub-folders")
    images, labels, patients = [], [], []
    mode = "RGB" if spec.channels == 3 else "L"
    ds = _pseudo_dataset()
    for k, name in enumerate(classes):
        for path in sorted((base / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(path) as im:
                arr = np.asarray(im.convert(mode), dtype=np.float32)
            frame = arr if mode == "L" else arr.mean(axis=2)
            spec_unit = spec.model_copy(
                update={"window_center": 127.5, "window_width": 256.0, "use_dataset_window": False}
            )
            images.append(_prepare(frame, ds, spec_unit))
            labels.append(k)
            patients.append(path.stem.split("_", 1)[0])
    if not images:
        raise DatasetError(f"image folder {base} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return ArraySet(
        images=np.stack(images).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        patients=patients,
        class_names=classes,
    )


# ----------------------------------------------------------------------------- splits


def _unique_patients(patients: Iterable[str]) -> list[str]:
    return sorted(set(patients))


def patient_split(
    patients: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> list[npt.NDArray[np.int64]]:
    """Sample indices for each part, assigning whole patients at random.

    ``fractions`` (summing to 1) are shares of *patients*; the parts are disjoint and
    together cover every sample.
    """
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    uniq = _unique_patients(patients)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    bounds = np.round(np.cumsum(fractions) * len(uniq)).astype(int)
    part_of: dict[str, int] = {}
    start = 0
    for part, end in enumerate(bounds):
        for i in order[start:end]:
            part_of[uniq[i]] = part
        start = end
    return [
        np.array([i for i, p in enumerate(patients) if part_of[p] == part], dtype=np.int64)
        for part in range(len(fractions))
    ]


def patient_kfold(
    patients: Sequence[str], k: int = 5, seed: int = 0
) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """``k`` (train, validation) index pairs; each patient validates in exactly one fold."""
    uniq = _unique_patients(patients)
    if not 2 <= k <= len(uniq):
        raise ValueError(f"k must be in 2..{len(uniq)} (the number of patients), got {k}")
    rng = np.random.default_rng(seed)
    fold_of = {uniq[i]: f % k for f, i in enumerate(rng.permutation(len(uniq)))}
    folds = []
    for f in range(k):
        val = np.array([i for i, p in enumerate(patients) if fold_of[p] == f], dtype=np.int64)
        train = np.array([i for i, p in enumerate(patients) if fold_of[p] != f], dtype=np.int64)
        folds.append((train, val))
    return folds
