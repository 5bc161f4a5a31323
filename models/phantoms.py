"""Synthetic phantoms with exact ground truth: radiograph-like images and CT-like volumes.

Real chest radiographs and CTs cannot be downloaded or shipped here, so the tests, the
demo models and ``airnode demo`` use images this module draws from a seed.  They are
not anatomy; they carry the properties a detector has to cope with:

* **Radiographs** (DX/CR, PS3.3 C.8.11): 12-bit stored values (0-4095, MONOCHROME2:
  high = more attenuation = brighter), a body outline, two darker lung fields, a
  brighter mediastinum, curved rib bands across the lungs, a slow gain/offset drift
  and quantum-like noise.  Positive images carry one nodule: the projection of a
  sphere (``sqrt(1 - r^2/R^2)`` profile) of varied radius, contrast and position,
  always inside a lung field.  The mask is the disc ``r <= R``.
* **CT volumes** (PS3.3 C.8.2): values in Hounsfield units, stored as ``uint16`` with
  Rescale Slope 1 and Rescale Intercept -1024 (the usual CT encoding): air -1000,
  fat about -100, soft tissue 40, a liver-like organ 60, lungs -850, a vertebra 700,
  noise.  Lesions are ellipsoids (soft-tissue density in the lung, hypodense in the
  liver-like organ) with a voxel-exact mask.

Everything is numpy only (no torch): the serving side imports it for ``airnode demo``
and the DICOM test studies of ``node.ops.synthetic``; training imports it for the
phantom data sets.  It is the one module of synthetic images (the domain-randomised
training generator is ``training.randomised``; the external test generator lives
under ``tests/external`` and shares nothing with either).
The same seed always gives the same images, on every platform.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = [
    "CT_RESCALE_INTERCEPT",
    "CT_RESCALE_SLOPE",
    "DX_MAX_VALUE",
    "CTLesion",
    "CTPhantom",
    "RadiographPhantom",
    "ct_phantom",
    "ct_phantoms",
    "quick_ct_volume",
    "quick_radiograph",
    "radiograph_phantom",
    "radiograph_phantoms",
]

DX_BITS_STORED = 12
DX_MAX_VALUE = (1 << DX_BITS_STORED) - 1
CT_RESCALE_SLOPE = 1.0
CT_RESCALE_INTERCEPT = -1024.0

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class RadiographPhantom:
    """One radiograph-like image and its exact ground truth.

    ``image`` is ``uint16`` (rows, cols) with values in 0..4095 (Bits Stored 12).
    ``label`` is 1 when a nodule is present.  ``mask`` is the nodule disc (all False
    for negatives); ``centre`` is its (row, col) in pixels and ``radius`` its radius
    in pixels (None / 0 for negatives).  ``contrast`` is the nodule's peak added value.
    ``lung_mask`` marks both lung fields.  ``pixel_spacing`` is in mm (row, col).
    """

    image: npt.NDArray[np.uint16]
    label: int
    mask: npt.NDArray[np.bool_]
    lung_mask: npt.NDArray[np.bool_]
    centre: tuple[float, float] | None
    radius: float
    contrast: float
    patient_id: str
    pixel_spacing: tuple[float, float]


@dataclass(frozen=True)
class CTLesion:
    """One ellipsoid lesion: centre (z, y, x) in voxels, semi-axes (z, y, x) in voxels."""

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    hu: float
    site: str  # "lung" or "liver"


@dataclass(frozen=True)
class CTPhantom:
    """One CT-like volume and its exact ground truth.

    ``stored`` is ``uint16`` (slices, rows, cols); HU = stored * slope + intercept
    (see :attr:`hu`).  ``mask`` is ``uint8`` with 1 inside any lesion.
    ``spacing`` is (slice thickness, row spacing, column spacing) in mm.
    """

    stored: npt.NDArray[np.uint16]
    mask: npt.NDArray[np.uint8]
    lesions: tuple[CTLesion, ...]
    spacing: tuple[float, float, float]
    patient_id: str
    rescale_slope: float = CT_RESCALE_SLOPE
    rescale_intercept: float = CT_RESCALE_INTERCEPT
    lung_mask: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def hu(self) -> npt.NDArray[np.float32]:
        """The volume in Hounsfield units (modality LUT applied, PS3.3 C.11.1)."""
        return (
            self.stored.astype(np.float32) * self.rescale_slope + self.rescale_intercept
        ).astype(np.float32)

    @property
    def lesion_volume_mm3(self) -> float:
        """Ground-truth lesion volume: voxel count times voxel volume."""
        return float(self.mask.sum()) * float(np.prod(self.spacing))

    @property
    def label(self) -> int:
        return int(self.mask.any())


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> FloatArray:
    """Low-frequency texture: a coarse random grid upsampled bilinearly to ``shape``."""
    coarse = rng.normal(0.0, 1.0, size=(cells + 1, cells + 1))
    ry = np.linspace(0, cells, shape[0])
    rx = np.linspace(0, cells, shape[1])
    y0 = np.minimum(ry.astype(int), cells - 1)
    x0 = np.minimum(rx.astype(int), cells - 1)
    fy = (ry - y0)[:, None]
    fx = (rx - x0)[None, :]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    return np.asarray(
        a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx,
        dtype=np.float64,
    )


def _check_size(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def radiograph_phantom(
    seed: int | np.random.Generator,
    *,
    size: int = 256,
    nodule: bool | None = None,
    radius_range: tuple[float, float] = (0.03, 0.06),
    contrast_range: tuple[float, float] = (500.0, 1000.0),
    noise_sigma: float = 35.0,
    patient_id: str = "PHANTOM",
) -> RadiographPhantom:
    """Draw one chest-radiograph-like image.

    ``nodule``: True/False forces the class; None draws it with probability 0.5.
    ``radius_range`` is a fraction of ``size`` (0.03-0.06 of a 350 mm field: about
    10-21 mm radius, i.e. 21-42 mm across; the upper end is a mass by the 30 mm
    convention); ``contrast_range`` is the peak added value in stored units (the lung
    background is about 700-1000, rib bands add about 220).
    """
    _check_size("size", size, 32)
    lo_r, hi_r = radius_range
    if not 0 < lo_r <= hi_r < 0.25:
        raise ValueError(f"radius_range must satisfy 0 < low <= high < 0.25, got {radius_range}")
    lo_c, hi_c = contrast_range
    if not 0 < lo_c <= hi_c:
        raise ValueError(f"contrast_range must satisfy 0 < low <= high, got {contrast_range}")
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
    rng = _rng(seed)
    has_nodule = bool(rng.random() < 0.5) if nodule is None else bool(nodule)

    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / s  # normalised coordinates

    # Body outline: an ellipse with jittered centre and axes.
    cy, cx = 0.52 + rng.normal(0, 0.01), 0.5 + rng.normal(0, 0.01)
    ay, ax = 0.50 + rng.normal(0, 0.02), 0.44 + rng.normal(0, 0.02)
    body = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0

    # Lung fields: two ellipses either side of the mediastinum.
    lung = np.zeros((size, size), dtype=bool)
    lung_params = []
    for side in (-1.0, 1.0):
        lcy = 0.45 + rng.normal(0, 0.015)
        lcx = cx + side * (0.19 + rng.normal(0, 0.01))
        lay = 0.28 + rng.normal(0, 0.015)
        lax = 0.13 + rng.normal(0, 0.01)
        lung |= ((yy - lcy) / lay) ** 2 + ((xx - lcx) / lax) ** 2 <= 1.0
        lung_params.append((lcy, lcx, lay, lax))
    lung &= body

    tissue = 1700.0 + rng.normal(0, 80)
    lung_level = 850.0 + rng.normal(0, 70)
    img = np.full((size, size), 150.0 + rng.normal(0, 20))  # direct exposure outside body
    img[body] = tissue
    # Soft lung edges: blend over a few pixels so edges are not a give-away step.
    img[lung] = lung_level
    # Mediastinum / heart: brighter band between the lungs, lower half wider.
    heart = ((yy - 0.62) / 0.16) ** 2 + ((xx - (cx + 0.03)) / 0.12) ** 2 <= 1.0
    img[heart & body] += 250.0 + rng.normal(0, 40)

    # Ribs: curved bands across each lung field.
    spacing = 0.075 + rng.normal(0, 0.005)
    phase = rng.uniform(0, spacing)
    thickness = 0.35 + rng.normal(0, 0.03)
    rib_gain = 220.0 + rng.normal(0, 30)
    ribs = np.zeros((size, size))
    for _lcy, lcx, _lay, _lax in lung_params:
        curve = 1.8 * (xx - lcx) ** 2 - 0.25 * np.abs(xx - lcx)
        t = ((yy + curve - phase) / spacing) % 1.0
        band = np.clip(1.0 - np.abs(t - 0.5) / (thickness / 2), 0.0, 1.0)
        ribs += np.sqrt(band)
    img += rib_gain * np.clip(ribs, 0, 1.5) * lung

    # Slow variation inside the body (scatter, thickness).
    img += 90.0 * _smooth_noise(rng, (size, size), 4) * body
    img += 40.0 * _smooth_noise(rng, (size, size), 16) * lung

    mask = np.zeros((size, size), dtype=bool)
    centre: tuple[float, float] | None = None
    radius = 0.0
    contrast = 0.0
    if has_nodule:
        radius = float(rng.uniform(lo_r, hi_r) * s)
        contrast = float(rng.uniform(lo_c, hi_c))
        rows, cols = np.nonzero(lung)
        for _ in range(200):
            k = int(rng.integers(len(rows)))
            r0, c0 = rows[k] + rng.uniform(-0.5, 0.5), cols[k] + rng.uniform(-0.5, 0.5)
            d2 = (np.arange(size)[:, None] - r0) ** 2 + (np.arange(size)[None, :] - c0) ** 2
            disc = d2 <= radius**2
            if disc.sum() > 0 and lung[disc].all():
                break
        else:  # pragma: no cover - lungs are always far larger than a nodule
            raise RuntimeError("could not place a nodule inside the lung fields")
        centre = (float(r0), float(c0))
        mask = disc
        profile = np.sqrt(np.clip(1.0 - d2 / radius**2, 0.0, 1.0))
        img += contrast * profile

    # Global gain/offset drift (exposure), then signal-dependent noise.
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 60)
    img += (
        rng.normal(0.0, 1.0, size=img.shape) * noise_sigma * np.sqrt(np.clip(img, 1, None) / 1000)
    )
    image = np.clip(np.rint(img), 0, DX_MAX_VALUE).astype(np.uint16)
    return RadiographPhantom(
        image=image,
        label=int(has_nodule),
        mask=mask,
        lung_mask=lung,
        centre=centre,
        radius=radius,
        contrast=contrast,
        patient_id=patient_id,
        pixel_spacing=(350.0 / s, 350.0 / s),
    )


def radiograph_phantoms(
    n: int,
    seed: int,
    *,
    size: int = 256,
    positive_fraction: float = 0.5,
    images_per_patient: int = 1,
    **kwargs: object,
) -> Iterator[RadiographPhantom]:
    """``n`` radiographs from one seed; exactly ``round(n * positive_fraction)`` positives.

    Patients are numbered ``P{seed}-{k}``; with ``images_per_patient`` > 1 consecutive
    images share a patient id (for testing patient-level splits).
    """
    _check_size("n", n, 1)
    _check_size("images_per_patient", images_per_patient, 1)
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    rng = _rng(seed)
    n_pos = round(n * positive_fraction)
    labels = np.array([1] * n_pos + [0] * (n - n_pos), dtype=bool)
    rng.shuffle(labels)
    for i in range(n):
        yield radiograph_phantom(
            rng,
            size=size,
            nodule=bool(labels[i]),
            patient_id=f"P{seed}-{i // images_per_patient:05d}",
            **kwargs,  # type: ignore[arg-type]
        )


def ct_phantom(
    seed: int | np.random.Generator,
    *,
    shape: tuple[int, int, int] = (24, 128, 128),
    n_lesions: int | None = None,
    radius_mm_range: tuple[float, float] = (6.0, 16.0),
    noise_hu: float = 15.0,
    spacing: tuple[float, float, float] = (3.0, 2.5, 2.5),
    patient_id: str = "PHANTOM",
) -> CTPhantom:
    """Draw one chest/upper-abdomen CT-like volume with ellipsoid lesions.

    ``n_lesions``: fixed count, or None for 0-3 at random (about 1 in 6 volumes has
    none).  ``radius_mm_range`` bounds each lesion's semi-axes in mm.
    """
    if len(shape) != 3 or any(int(v) < 8 for v in shape):
        raise ValueError(f"shape must be three sizes >= 8 (slices, rows, cols), got {shape}")
    if len(spacing) != 3 or any(v <= 0 for v in spacing):
        raise ValueError(f"spacing must be three positive mm values, got {spacing}")
    lo, hi = radius_mm_range
    if not 0 < lo <= hi:
        raise ValueError(f"radius_mm_range must satisfy 0 < low <= high, got {radius_mm_range}")
    if noise_hu < 0:
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
    rng = _rng(seed)
    if n_lesions is None:
        n_lesions = int(rng.choice([0, 1, 1, 2, 2, 3]))
    if n_lesions < 0:
        raise ValueError(f"n_lesions must be >= 0, got {n_lesions}")
    nz, ny, nx = (int(v) for v in shape)
    zz, yy, xx = np.meshgrid(
        np.linspace(0, 1, nz), np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij"
    )
    hu = np.full(shape, -1000.0)
    cy, cx = 0.5 + rng.normal(0, 0.01), 0.5 + rng.normal(0, 0.01)
    ay, ax = 0.36 + rng.normal(0, 0.015), 0.46 + rng.normal(0, 0.015)
    r_body = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2
    body = r_body <= 1.0
    hu[body] = -100.0 + rng.normal(0, 10)  # subcutaneous fat rim
    inner = r_body <= 0.8
    hu[inner] = 40.0 + rng.normal(0, 5)  # soft tissue
    # Lungs occupy the upper (cranial) slices, the liver-like organ the lower ones.
    lung_extent = 0.55 + rng.normal(0, 0.04)
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        lcx = cx + side * (0.2 + rng.normal(0, 0.01))
        lcy = cy - 0.02 + rng.normal(0, 0.01)
        taper = np.clip(1.0 - zz / lung_extent, 0.0, 1.0) ** 0.5
        lungs |= ((yy - lcy) / (0.25 * taper + 1e-6)) ** 2 + (
            (xx - lcx) / (0.15 * taper + 1e-6)
        ) ** 2 <= 1.0
    lungs &= inner
    hu[lungs] = -850.0 + rng.normal(0, 20)
    liver = (
        (((yy - (cy + 0.02)) / 0.22) ** 2 + ((xx - (cx - 0.12)) / 0.25) ** 2 <= 1.0)
        & (zz > lung_extent - 0.05)
        & inner
        & ~lungs
    )
    hu[liver] = 60.0 + rng.normal(0, 5)
    spine = ((yy - (cy + 0.26)) / 0.06) ** 2 + ((xx - cx) / 0.06) ** 2 <= 1.0
    hu[spine & inner] = 700.0 + rng.normal(0, 40)
    # Lung vessels: small bright blobs that are not lesions.
    for _ in range(int(rng.integers(10, 25))):
        pz, py, px = rng.uniform(0, 1, 3)
        blob = ((zz - pz) * nz) ** 2 / 2 + ((yy - py) * ny) ** 2 + ((xx - px) * nx) ** 2 <= 1.5
        hu[blob & lungs] = -50.0

    mask = np.zeros(shape, dtype=np.uint8)
    lesions: list[CTLesion] = []
    vz, vy, vx = (float(v) for v in spacing)
    grid_z = np.arange(nz, dtype=np.float64)[:, None, None]
    grid_y = np.arange(ny, dtype=np.float64)[None, :, None]
    grid_x = np.arange(nx, dtype=np.float64)[None, None, :]
    for _ in range(n_lesions):
        site = "lung" if rng.random() < 0.6 and lungs.any() else "liver"
        region = lungs if site == "lung" else liver
        if not region.any():
            region = inner
            site = "liver"
        semi_mm = rng.uniform(lo, hi, 3)
        semi = (semi_mm[0] / vz, semi_mm[1] / vy, semi_mm[2] / vx)
        zs, ys, xs = np.nonzero(region)
        for _attempt in range(50):
            k = int(rng.integers(len(zs)))
            c = (float(zs[k]), float(ys[k]), float(xs[k]))
            ell = (
                ((grid_z - c[0]) / semi[0]) ** 2
                + ((grid_y - c[1]) / semi[1]) ** 2
                + ((grid_x - c[2]) / semi[2]) ** 2
            ) <= 1.0
            inside = region[ell].mean() if ell.any() else 0.0
            if ell.any() and inside > 0.9:
                break
        lesion_hu = float(rng.uniform(10, 60) if site == "lung" else rng.uniform(-10, 15))
        ell &= inner
        hu[ell] = lesion_hu
        mask[ell] = 1
        lesions.append(CTLesion(centre=c, semi_axes=semi, hu=lesion_hu, site=site))

    hu += rng.normal(0.0, noise_hu, size=shape)
    stored = np.clip(np.rint((hu - CT_RESCALE_INTERCEPT) / CT_RESCALE_SLOPE), 0, 4095)
    return CTPhantom(
        stored=stored.astype(np.uint16),
        mask=mask,
        lesions=tuple(lesions),
        spacing=(vz, vy, vx),
        patient_id=patient_id,
        lung_mask=lungs,
    )


def ct_phantoms(n: int, seed: int, **kwargs: object) -> Iterator[CTPhantom]:
    """``n`` CT volumes from one seed, patients ``C{seed}-{k}``."""
    _check_size("n", n, 1)
    rng = _rng(seed)
    for i in range(n):
        yield ct_phantom(rng, patient_id=f"C{seed}-{i:05d}", **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------ quick test images
# Fast, simple pixels for DICOM plumbing tests and benchmarks (no ground truth).


def quick_ct_volume(n_slices: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A CT-like volume in Hounsfield units, shape ``(n_slices, rows, cols)``, int16.

    Air outside an elliptical body (soft tissue ~40 HU), two lungs (~-800 HU) in the
    upper half of the volume, a spine (~700 HU) and a little noise.
    """
    if n_slices < 1 or rows < 8 or cols < 8:
        raise ValueError(f"volume must be at least 1x8x8, got {n_slices}x{rows}x{cols}")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    body = ((x - cx) / (0.42 * cols)) ** 2 + ((y - cy) / (0.32 * rows)) ** 2 <= 1
    spine = ((x - cx) / (0.05 * cols)) ** 2 + ((y - cy - 0.2 * rows) / (0.05 * rows)) ** 2 <= 1
    lung_l = ((x - cx + 0.18 * cols) / (0.13 * cols)) ** 2 + ((y - cy) / (0.2 * rows)) ** 2 <= 1
    lung_r = ((x - cx - 0.18 * cols) / (0.13 * cols)) ** 2 + ((y - cy) / (0.2 * rows)) ** 2 <= 1
    base = np.full((rows, cols), -1000.0, dtype=np.float32)
    base[body] = 40.0
    base[spine] = 700.0
    vol = np.empty((n_slices, rows, cols), dtype=np.int16)
    for k in range(n_slices):
        sl = base.copy()
        if k < (2 * n_slices) // 3:
            sl[lung_l | lung_r] = -800.0
        sl += rng.normal(0.0, 12.0, size=sl.shape).astype(np.float32)
        vol[k] = np.clip(sl, -1024, 3071).astype(np.int16)
    return vol


def quick_radiograph(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A chest-radiograph-like image, 12-bit values in a uint16 array (bright = dense)."""
    if rows < 8 or cols < 8:
        raise ValueError(f"image must be at least 8x8, got {rows}x{cols}")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    img = np.full((rows, cols), 2600.0, dtype=np.float32)  # soft tissue
    img[(((x - cx) / (0.46 * cols)) ** 2 + ((y - cy) / (0.48 * rows)) ** 2) > 1] = 300.0  # air
    for side in (-1, 1):
        lung = ((x - cx - side * 0.2 * cols) / (0.15 * cols)) ** 2 + (
            (y - cy + 0.05 * rows) / (0.3 * rows)
        ) ** 2 <= 1
        img[lung] = 1100.0
    img[np.abs(x - cx) < 0.03 * cols] = 3500.0  # spine / mediastinum
    img += rng.normal(0, 30, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.uint16)
