"""The EXTERNAL test generator: chest radiographs and CT volumes for evaluation only.

Written separately from the training generator (``training/randomised.py``) and
sharing no code with it, so that a model cannot score well here by having learned a
quirk of the images it was trained on.  Nothing under ``training/`` or ``models/``
imports this module (an import-linter contract checks it), and it is never used for
training, model selection or thresholds.

It deliberately uses a different model of image formation:

* **Radiographs** are *projections of a 3-D analytic phantom*: the body, lungs,
  heart, spine, ribs (elliptic arcs), vessels (straight-segment trees) and the nodule
  are ellipsoids, tubes and spheres with linear attenuation coefficients; each pixel
  is the line integral through them (closed form for ellipsoids), photons are counted
  with Poisson noise (Beer-Lambert), then the detector takes the logarithm and stores
  it at a chosen bit depth, MONOCHROME2 or inverted as MONOCHROME1, 512 x 512 by
  default.  The training generator paints 2-D shapes in the display domain instead.
* **CT volumes** are voxelised 3-D scenes: a body cylinder whose cross-section
  changes along z, lungs and liver as ellipsoids, spine and aorta as cylinders, vessel
  tubes through the lungs, spherical lesions, each voxel the mean of 3 sub-samples along
  z (partial volume) blurred in-plane by a binomial kernel, then noise in HU and the
  usual unsigned storage with Rescale Intercept -1024.

Each sample comes as pydicom data sets (in memory, Explicit VR Little Endian), so the
node's own predictor takes it exactly as it takes images from a modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

__all__ = ["ExternalCT", "ExternalRadiograph", "external_ct", "external_radiograph", "store_dx"]

DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
_ROOT = "2.25."


@dataclass(frozen=True)
class ExternalRadiograph:
    """A projection radiograph and its truth, before storage (``attenuation``: log domain)."""

    attenuation: npt.NDArray[np.float64]  # detector log signal, high = dense
    label: int
    mask: npt.NDArray[np.bool_]
    diameter_mm: float
    contrast: float  # nodule peak / (soft tissue - lung) of the projection
    spacing_mm: float


@dataclass(frozen=True)
class ExternalCT:
    """A CT volume and its truth (``lesions``: diameter mm, ΔHU vs. surroundings, site)."""

    datasets: list[Dataset]
    mask: npt.NDArray[np.bool_]  # (slices, rows, cols)
    labels: npt.NDArray[np.int32]  # lesion index + 1 per voxel, 0 elsewhere
    lesions: list[tuple[float, float, str]]
    spacing: tuple[float, float, float]  # slice, row, col (mm)


# ----------------------------------------------------------------- radiographs


def _ellipsoid_path(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    cx: float,
    cy: float,
    a: float,
    b: float,
    c: float,
) -> npt.NDArray[np.float64]:
    """Length of the ray along z through an axis-aligned ellipsoid, per detector pixel."""
    q = 1.0 - ((x - cx) / a) ** 2 - ((y - cy) / b) ** 2
    return np.asarray(2.0 * c * np.sqrt(np.clip(q, 0.0, None)))


def _tube_path(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    p0: tuple[float, float],
    p1: tuple[float, float],
    radius: float,
) -> npt.NDArray[np.float64]:
    """Path length through a cylinder lying in the detector plane (segment p0-p1)."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    seg = dx * dx + dy * dy
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(seg, 1e-9), 0.0, 1.0)
    d2 = (x - (x0 + t * dx)) ** 2 + (y - (y0 + t * dy)) ** 2
    return np.asarray(2.0 * np.sqrt(np.clip(radius**2 - d2, 0.0, None)))


def _box(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    box: tuple[float, float, float, float],
) -> tuple[slice, slice] | None:
    """The detector pixels a box (x0, x1, y0, y1 in mm) covers, or None."""
    xs, ys = x[0], y[:, 0]
    c0, c1 = int(np.searchsorted(xs, box[0])), int(np.searchsorted(xs, box[1])) + 1
    r0, r1 = int(np.searchsorted(ys, box[2])), int(np.searchsorted(ys, box[3])) + 1
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def external_radiograph(
    seed: int,
    *,
    nodule: bool,
    size: int = 512,
    diameter_mm: float | None = None,
    contrast: float | None = None,
) -> ExternalRadiograph:
    """One PA chest projection; coordinates in mm, detector ``size`` x ``size``."""
    rng = np.random.default_rng([seed, 0xE7])
    fov = rng.uniform(340.0, 420.0)
    px = fov / size
    coords = (np.arange(size) + 0.5) * px - fov / 2
    x, y = np.meshgrid(coords, coords)  # y grows downwards (feet)
    mu_soft, mu_lung, mu_bone = 0.021, 0.004, 0.045  # 1/mm, about 60 keV
    line = mu_soft * _ellipsoid_path(
        x,
        y,
        rng.normal(0, 5),
        rng.uniform(0, 25),
        rng.uniform(150, 180),
        rng.uniform(190, 230),
        rng.uniform(100, 130),
    )
    lungs = []
    for side in (-1, 1):
        lx = side * rng.uniform(65, 90)
        ly = rng.uniform(-50, -20)
        la, lb, lc = rng.uniform(50, 70), rng.uniform(95, 125), rng.uniform(60, 80)
        lungs.append((lx, ly, la, lb, lc))
        line -= (mu_soft - mu_lung) * _ellipsoid_path(x, y, lx, ly, la, lb, lc)
    heart = (
        mu_soft
        * 0.15
        * _ellipsoid_path(
            x,
            y,
            rng.uniform(5, 30),
            rng.uniform(30, 60),
            rng.uniform(55, 75),
            rng.uniform(50, 70),
            rng.uniform(45, 60),
        )
    )
    line += heart
    line += (mu_bone - mu_soft) * _ellipsoid_path(x, y, 0, 0, rng.uniform(14, 20), 400, 15)
    # ribs: thin elliptic arcs, each the difference of two confocal ellipses' paths
    for k in range(int(rng.integers(7, 11))):
        for side in (-1, 1):
            cy = -120 + k * rng.uniform(24, 30)
            a, b = rng.uniform(100, 140), rng.uniform(35, 55)

            sl = _box(x, y, (side * 10 - a, side * 10 + a, cy - b, cy))
            if sl is not None:
                xs, ys = x[sl], y[sl]
                outer = _ellipsoid_path(xs, ys, side * 10.0, cy, a, b, 8.0)
                inner = _ellipsoid_path(xs, ys, side * 10.0, cy, a - 7, b - 7, 8.0)
                arc = np.clip(outer - inner, 0, None) * ((xs * side) > 5) * (ys < cy)
                line[sl] += (mu_bone - mu_soft) * 1.2 * arc
    # vessels: trees of straight tubes from each hilum, tapering
    for lx, ly, _la, lb, _lc in lungs:
        stack = [((lx * 0.45, ly + lb * 0.35), rng.uniform(0, 2 * math.pi), 3.0, 0)]
        while stack:
            (sx, sy), ang, r, depth = stack.pop()
            length = rng.uniform(20, 45)
            ex, ey = sx + length * math.cos(ang), sy + length * math.sin(ang)
            sl = _box(x, y, (min(sx, ex) - r, max(sx, ex) + r, min(sy, ey) - r, max(sy, ey) + r))
            if sl is not None:
                tube = _tube_path(x[sl], y[sl], (sx, sy), (ex, ey), r)
                line[sl] += (mu_soft - mu_lung) * 1.5 * tube
            if depth < 3:
                for turn in (-0.5, 0.5):
                    stack.append(((ex, ey), ang + turn + rng.normal(0, 0.2), r * 0.7, depth + 1))
    # the nodule: a sphere of soft tissue inside a lung
    lung_path = sum(_ellipsoid_path(x, y, lx, ly, la, lb, lc) for lx, ly, la, lb, lc in lungs)
    in_lung = lung_path > 30.0
    body_only = (line > 0) & ~in_lung & (np.abs(x) < 150)
    gap = float(np.median(line[body_only]) - np.median(line[in_lung])) if np.any(in_lung) else 1.0
    mask = np.zeros((size, size), dtype=bool)
    d_mm = 0.0
    con = 0.0
    if nodule:
        d_mm = diameter_mm if diameter_mm is not None else float(rng.uniform(3.0, 30.0))
        con = contrast if contrast is not None else float(rng.uniform(0.1, 1.0))
        r = d_mm / 2
        inside = np.argwhere(in_lung & (lung_path > 2 * r + 20))
        if not len(inside):
            inside = np.argwhere(in_lung)
        iy, ix = inside[int(rng.integers(len(inside)))]
        ncx, ncy = coords[ix], coords[iy]
        # peak added attenuation con * gap at the centre; path length 2r there
        mu_n = con * gap / (2 * r)
        line += mu_n * _ellipsoid_path(x, y, ncx, ncy, r, r, r)
        mask = (x - ncx) ** 2 + (y - ncy) ** 2 <= r**2
    # photon counting and the detector's log
    photons = rng.uniform(3e3, 3e4)
    counts = rng.poisson(photons * np.exp(-line)).astype(np.float64)
    att = -np.log(np.maximum(counts, 0.5) / photons)
    # detector unsharpness: a 3-tap binomial blur, once or twice
    for _ in range(int(rng.integers(1, 3))):
        att = (np.roll(att, 1, 0) + 2 * att + np.roll(att, -1, 0)) / 4
        att = (np.roll(att, 1, 1) + 2 * att + np.roll(att, -1, 1)) / 4
    return ExternalRadiograph(att, int(nodule), mask, d_mm, con, float(px))


def store_dx(
    img: ExternalRadiograph,
    *,
    bits: int = 12,
    photometric: str = "MONOCHROME2",
    seed: int = 0,
    window: bool = False,
) -> Dataset:
    """Store a radiograph as a DX data set with ``bits`` bits (full range used)."""
    att = img.attenuation
    lo, hi = np.percentile(att, [0.05, 99.95])
    top = 2**bits - 1
    stored = np.clip(np.rint((att - lo) / (hi - lo) * top), 0, top).astype(np.int64)
    if photometric == "MONOCHROME1":
        stored = top - stored
    ds = _base(DX_CLASS, "DX", seed)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImagerPixelSpacing = [f"{img.spacing_mm:.6f}", f"{img.spacing_mm:.6f}"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    _pixels(ds, stored, bits, photometric)
    if window:
        ds.WindowCenter = top / 2
        ds.WindowWidth = top + 1
    return ds


# ------------------------------------------------------------------------- CT


def external_ct(
    seed: int,
    *,
    n_slices: int = 40,
    size: int = 256,
    thickness: float | None = None,
    noise_hu: float | None = None,
    lesions: list[tuple[float, float, str]] | None = None,
) -> ExternalCT:
    """A thorax-to-upper-abdomen CT volume with ``lesions`` (diameter mm, ΔHU, site).

    ``lesions=None`` draws 0-3 at random (lung: solid, ΔHU vs lung about +800..+900;
    liver: ΔHU -60..-15 or +20..+40), 3-30 mm across.
    """
    rng = np.random.default_rng([seed, 0xC7])
    dz = thickness if thickness is not None else float(rng.choice([1.25, 2.5, 3.0, 5.0]))
    noise = noise_hu if noise_hu is not None else float(rng.uniform(12.0, 25.0))
    fov = rng.uniform(330, 420)
    px = fov / size
    z_mm = (np.arange(n_slices) - n_slices / 2) * dz
    xy = (np.arange(size) + 0.5) * px - fov / 2
    # sub-samples along z (partial volume of thick slices)
    sub_z = np.array([-1 / 3, 0.0, 1 / 3]) * dz
    body_a, body_b = rng.uniform(140, 175), rng.uniform(95, 125)
    lung_x = rng.uniform(60, 85)
    lung_top, lung_bottom = z_mm.min() - 40, rng.uniform(-0.1, 0.3) * (z_mm.max() - z_mm.min())
    liver_c = (-rng.uniform(40, 70), rng.uniform(-10, 20), lung_bottom + rng.uniform(50, 80))
    liver_ax = (rng.uniform(70, 95), rng.uniform(60, 80), rng.uniform(70, 100))
    aorta = (rng.uniform(-10, 15), rng.uniform(35, 55), rng.uniform(10, 15))
    spine = (0.0, rng.uniform(60, 80), rng.uniform(14, 20))
    vessels = [
        (
            np.array(
                [s * lung_x * 0.4, rng.uniform(-20, 20), rng.uniform(z_mm.min(), lung_bottom)]
            ),
            rng.normal(0, 1, 3),
            rng.uniform(1.0, 3.0),
        )
        for s in (-1, 1)
        for _ in range(int(rng.integers(6, 12)))
    ]
    if lesions is None:
        lesions = []
        for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
            d = float(rng.uniform(3.0, 30.0))
            if rng.random() < 0.5:
                lesions.append((d, float(rng.uniform(780, 900)), "lung"))
            else:
                dhu = (
                    float(rng.uniform(-60, -15))
                    if rng.random() < 0.75
                    else float(rng.uniform(20, 40))
                )
                lesions.append((d, dhu, "liver"))
    # place lesions: centres inside their organ, away from its border
    placed: list[tuple[npt.NDArray[np.float64], float, float, str]] = []
    for d, dhu, site in lesions:
        r = d / 2
        for _ in range(200):
            if site == "lung":
                s = rng.choice([-1, 1])
                z_lo, z_hi = z_mm.min() + r, min(lung_bottom - r - 10, z_mm.max() - r)
                if z_hi < z_lo:
                    continue  # the lung is too short here for this lesion: draw again
                c = np.array(
                    [
                        s * lung_x + rng.uniform(-25, 25),
                        rng.uniform(-40, 30),
                        rng.uniform(z_lo, z_hi),
                    ]
                )
                q = _lung_q(c[None, :], lung_x, lung_top, lung_bottom, margin=r + 4)
            else:
                c = np.array(liver_c) + rng.uniform(-0.5, 0.5, 3) * np.array(liver_ax)
                c[2] = np.clip(c[2], z_mm.min() + r, z_mm.max() - r)
                q = _ell_q(c[None, :], liver_c, tuple(a - r - 4 for a in liver_ax))
            if q[0] <= 1.0:
                placed.append((c, r, dhu, site))
                break
    hu = np.zeros((n_slices, size, size))
    labels = np.zeros((n_slices, size, size), dtype=np.int32)
    for k, z in enumerate(z_mm):
        acc = np.zeros((size, size))
        X, Y = np.meshgrid(xy, xy)
        for oz in sub_z:
            pts = np.stack([X, Y, np.full_like(X, z + oz)], -1)
            acc += _scene(
                pts,
                body_a,
                body_b,
                lung_x,
                lung_top,
                lung_bottom,
                liver_c,
                liver_ax,
                aorta,
                spine,
                vessels,
                placed,
            )
        acc /= len(sub_z)
        # in-plane partial volume and the reconstruction kernel: binomial blur
        acc = (np.roll(acc, 1, 0) + 2 * acc + np.roll(acc, -1, 0)) / 4
        hu[k] = (np.roll(acc, 1, 1) + 2 * acc + np.roll(acc, -1, 1)) / 4
        for i, (c, r, _dhu, _site) in enumerate(placed):
            inside = (X - c[0]) ** 2 + (Y - c[1]) ** 2 + (z - c[2]) ** 2 <= r**2
            labels[k][inside] = i + 1
    hu += rng.normal(0, noise, hu.shape) * (hu > -990)
    stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.int64)
    study, series = generate_uid(_ROOT), generate_uid(_ROOT)
    datasets = []
    for k in range(n_slices):
        ds = _base(CT_CLASS, "CT", seed * 1000 + k, study=study, series=series)
        ds.BodyPartExamined = "CHEST"
        ds.PixelSpacing = [f"{px:.6f}", f"{px:.6f}"]
        ds.SliceThickness = f"{dz:g}"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [f"{-fov / 2:.3f}", f"{-fov / 2:.3f}", f"{z_mm[k]:.3f}"]
        ds.InstanceNumber = k + 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        _pixels(ds, stored[k], 12, "MONOCHROME2")
        datasets.append(ds)
    info = [(2 * r, dhu, site) for _c, r, dhu, site in placed]
    return ExternalCT(datasets, labels > 0, labels, info, (dz, px, px))


def _ell_q(
    pts: npt.NDArray[np.float64],
    c: tuple[float, ...] | npt.NDArray[np.float64],
    ax: tuple[float, ...],
) -> npt.NDArray[np.float64]:
    return np.asarray(sum(((pts[..., i] - c[i]) / ax[i]) ** 2 for i in range(3)))


def _lung_q(
    pts: npt.NDArray[np.float64], lung_x: float, top: float, bottom: float, margin: float = 0.0
) -> npt.NDArray[np.float64]:
    """<= 1 inside either lung: ellipsoids with a flat-ish base above the diaphragm."""
    zc, zr = (top + bottom) / 2, (bottom - top) / 2 - margin
    q = np.full(pts.shape[:-1], np.inf)
    for s in (-1, 1):
        qi = (
            ((pts[..., 0] - s * lung_x) / (55 - margin)) ** 2
            + ((pts[..., 1] + 5) / (75 - margin)) ** 2
            + ((pts[..., 2] - zc) / max(zr, 1.0)) ** 4
        )
        q = np.minimum(q, qi)
    return q


def _scene(
    pts: npt.NDArray[np.float64],
    body_a: float,
    body_b: float,
    lung_x: float,
    lung_top: float,
    lung_bottom: float,
    liver_c: tuple[float, float, float],
    liver_ax: tuple[float, float, float],
    aorta: tuple[float, float, float],
    spine: tuple[float, float, float],
    vessels: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]],
    lesions: list[tuple[npt.NDArray[np.float64], float, float, str]],
) -> npt.NDArray[np.float64]:
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    hu = np.full(x.shape, -1000.0)
    body = (x / body_a) ** 2 + (y / body_b) ** 2 <= 1
    muscle = (x / (body_a - 12)) ** 2 + (y / (body_b - 12)) ** 2 <= 1
    hu[body] = -90.0
    hu[muscle] = 45.0
    lung = (_lung_q(pts, lung_x, lung_top, lung_bottom) <= 1) & muscle
    hu[lung] = -860.0
    liver = (_ell_q(pts, liver_c, liver_ax) <= 1) & muscle & ~lung
    hu[liver] = 58.0
    hu[((x - aorta[0]) ** 2 + (y - aorta[1]) ** 2 <= aorta[2] ** 2) & muscle] = 40.0
    hu[((x - spine[0]) ** 2 + (y - spine[1]) ** 2 <= spine[2] ** 2) & muscle] = 650.0
    table = (np.abs(y - body_b - 15) < 4) & (np.abs(x) < 200)
    hu[table] = 150.0
    lung_idx = np.flatnonzero(lung.ravel())
    if lung_idx.size:
        lp = pts.reshape(-1, 3)[lung_idx]
        vessel = np.zeros(lung_idx.size, dtype=bool)
        for p0, d, r in vessels:
            u = d / np.linalg.norm(d)
            rel = lp - p0
            t = np.clip(rel @ u, 0, 70)
            vessel |= np.sum((rel - t[:, None] * u) ** 2, -1) <= r * r
        hu.ravel()[lung_idx[vessel]] = 30.0
    for c, r, dhu, site in lesions:
        if abs(float(z.flat[0]) - c[2]) > r:
            continue
        inside = np.sum((pts - c) ** 2, -1) <= r * r
        base = -860.0 if site == "lung" else 58.0
        hu[inside] = base + dhu
    return hu


# ------------------------------------------------------------------ DICOM storage


def _base(
    sop_class: str, modality: str, seed: int, *, study: str | None = None, series: str | None = None
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    sop = generate_uid(_ROOT)
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study or generate_uid(_ROOT)
    ds.SeriesInstanceUID = series or generate_uid(_ROOT)
    ds.Modality = modality
    ds.PatientID = f"EXT{seed}"
    ds.PatientName = "External^Phantom"
    return ds


def _pixels(ds: Dataset, stored: npt.NDArray[np.int64], bits: int, photometric: str) -> None:
    allocated = 8 if bits <= 8 else 16
    ds.Rows, ds.Columns = (int(v) for v in stored.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype(np.uint8 if allocated == 8 else np.uint16).tobytes()
