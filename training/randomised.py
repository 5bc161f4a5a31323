"""Domain-randomised training images: radiographs and CT slices that vary in every
property a model must not depend on.

The first demo models learned a cue of the one phantom generator they saw (a fixed
anatomy layout, one bit depth, one photometric interpretation) and failed on anything
else.  This generator draws each image from wide, independent distributions so that
the only thing that separates the classes is the lesion itself:

* **anatomy**: body outline as a superellipse of random size, aspect and squareness;
  lungs, heart, diaphragm, organs of random size and position; slice level (chest
  or upper abdomen) for CT;
* **distractors**: ribs (posterior and anterior sets of random spacing, curvature and
  density), clavicles, spine, branching vessels and vessels seen end-on (round
  bright dots, the classic nodule mimic), devices (wires, tubes, ECG electrodes,
  metal clips), the CT table;
* **lesions**: 3-30 mm across, contrast down to a tenth of the lung/soft-tissue gap
  (radiographs) or ΔHU ±10 (CT), placed anywhere in the lung or a solid organ;
* **acquisition**: matrix size and aspect ratio, pixel spacing, slice thickness
  1-5 mm (partial volume of the lesion along z), blur, noise level and texture,
  detector gain, offset and transfer curve, bit depth 8-16, MONOCHROME1 or
  MONOCHROME2, a VOI window in the header or none, CT stored signed or unsigned.

Each sample is returned as stored pixels plus the few header attributes the
preprocessing reads (:func:`pseudo_header`), so it goes through exactly the same
grey-level code as a DICOM image on the node.

This module is for training only.  The external test generator
(``tests/external_phantoms.py``) is written separately and shares no code with it;
training code never imports that one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from scipy import ndimage

__all__ = [
    "RandomCTSlice",
    "RandomRadiograph",
    "pseudo_header",
    "random_ct_slice",
    "random_radiograph",
]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class RandomRadiograph:
    """Stored pixels, header attributes and ground truth of one randomised radiograph."""

    stored: npt.NDArray[np.uint16]
    header: Dataset
    label: int
    mask: npt.NDArray[np.bool_]
    centre: tuple[float, float] | None
    diameter_mm: float
    contrast: float  # fraction of the lung / soft-tissue gap
    pixel_spacing: tuple[float, float]


@dataclass(frozen=True)
class RandomCTSlice:
    """Stored pixels, header attributes and lesion mask of one randomised CT slice."""

    stored: npt.NDArray[np.int32]
    header: Dataset
    mask: npt.NDArray[np.bool_]
    pixel_spacing: tuple[float, float]
    slice_thickness: float


def pseudo_header(
    *,
    bits: int,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    signed: bool = False,
    window: tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
) -> Dataset:
    """The attributes the grey-level steps read, for pixels that come without DICOM."""
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.BitsStored = bits
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter = round(window[0], 2)
        ds.WindowWidth = round(max(window[1], 2.0), 2)
    if pixel_spacing is not None:
        ds.PixelSpacing = [round(pixel_spacing[0], 6), round(pixel_spacing[1], 6)]
    return ds


# ----------------------------------------------------------------------- shapes


def _superellipse(
    yy: F64, xx: F64, cy: float, cx: float, ay: float, ax: float, p: float
) -> npt.NDArray[np.bool_]:
    return np.asarray(
        (np.abs((yy - cy) / ay) ** p + np.abs((xx - cx) / ax) ** p) <= 1.0, dtype=bool
    )


def _soft(inside: npt.NDArray[np.bool_], sigma_px: float) -> F64:
    """A 0..1 map with blurred edges (no step a net could use as a give-away)."""
    out = inside.astype(np.float64)
    return ndimage.gaussian_filter(out, sigma_px) if sigma_px > 0 else out


def _polyline(
    canvas: F64,
    rng: np.random.Generator,
    start: tuple[float, float],
    direction: float,
    length_px: float,
    width_px: float,
    value: float,
    wiggle: float = 0.3,
) -> None:
    """Draw a smooth random line (vessel, wire, tube) with a Gaussian cross-profile."""
    h, w = canvas.shape
    y, x = start
    steps = max(2, int(length_px / 2))
    rad = max(width_px, 0.6)
    r = int(np.ceil(3 * rad))
    for _ in range(steps):
        direction += rng.normal(0, wiggle)
        y += 2 * np.sin(direction)
        x += 2 * np.cos(direction)
        iy, ix = round(y), round(x)
        if not (r <= iy < h - r and r <= ix < w - r):
            break
        gy, gx = np.mgrid[iy - r : iy + r + 1, ix - r : ix + r + 1]
        d2 = (gy - y) ** 2 + (gx - x) ** 2
        patch = value * np.exp(-d2 / (2 * rad**2))
        sub = canvas[iy - r : iy + r + 1, ix - r : ix + r + 1]
        np.maximum(sub, patch, out=sub)


def _blob(canvas: F64, cy: float, cx: float, radius_px: float, value: float) -> None:
    """Add a sphere's projection (``sqrt(1 - r²/R²)``) of peak ``value``."""
    h, w = canvas.shape
    r = int(np.ceil(radius_px)) + 1
    y0, y1 = max(0, int(cy) - r), min(h, int(cy) + r + 2)
    x0, x1 = max(0, int(cx) - r), min(w, int(cx) + r + 2)
    if y0 >= y1 or x0 >= x1:
        return
    gy, gx = np.mgrid[y0:y1, x0:x1]
    d2 = ((gy - cy) ** 2 + (gx - cx) ** 2) / max(radius_px, 0.3) ** 2
    canvas[y0:y1, x0:x1] += value * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))


def _quantise(
    signal: F64, rng: np.random.Generator, bits: int
) -> tuple[npt.NDArray[np.uint16], float, float]:
    """Map a 0..1 signal onto a random part of the ``bits`` range (gain, offset)."""
    top = float(2**bits - 1)
    span = rng.uniform(0.35, 1.0) * top
    offset = rng.uniform(0.0, top - span)
    stored = np.clip(np.rint(offset + signal * span), 0, top).astype(np.uint16)
    return stored, offset, span


def _header_window(
    stored: npt.NDArray[np.generic], rng: np.random.Generator
) -> tuple[float, float]:
    """A vendor-like display window: roughly the image's range, jittered."""
    sample = np.asarray(stored[::3, ::3], dtype=np.float64)
    lo, hi = (float(v) for v in np.percentile(sample, [rng.uniform(0, 3), 99.5]))
    lo -= rng.uniform(-0.05, 0.15) * (hi - lo)
    hi += rng.uniform(-0.05, 0.15) * (hi - lo)
    return (lo + hi) / 2, max(hi - lo, 2.0)


# ------------------------------------------------------------------ radiographs


def random_radiograph(
    rng: np.random.Generator,
    *,
    nodule: bool,
    diameter_mm: tuple[float, float] = (3.0, 30.0),
    contrast: tuple[float, float] = (0.1, 1.0),
    max_matrix: int = 384,
) -> RandomRadiograph:
    """One chest radiograph with (``nodule=True``) or without a nodule.

    The image is built as attenuation (bright = dense): lungs low, soft tissue high,
    bone higher; the nodule adds ``contrast`` x (soft tissue - lung) at its centre.
    """
    rows = int(rng.integers(224, max_matrix + 1))
    aspect = float(rng.uniform(0.8, 1.25))
    cols = int(np.clip(round(rows * aspect), 200, max_matrix + 64))
    fov = float(rng.uniform(300.0, 430.0))  # mm across the rows
    spacing = fov / rows
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    yy /= rows
    xx /= rows  # square pixels: x in units of the image height

    lung_level = 0.0
    tissue = rng.uniform(0.45, 0.7)  # soft tissue attenuation, lungs at 0 + air
    gap = tissue - lung_level
    width = cols / rows
    cx = width / 2 + rng.normal(0, 0.03)
    body = _superellipse(
        yy,
        xx,
        0.55 + rng.normal(0, 0.03),
        cx,
        rng.uniform(0.45, 0.6),
        rng.uniform(0.38, 0.5) * min(width, 1.1),
        rng.uniform(2.0, 4.0),
    )
    img = np.where(body, tissue, rng.uniform(-0.25, -0.1))
    img = ndimage.gaussian_filter(img, rng.uniform(1.0, 4.0))

    lungs = np.zeros((rows, cols), dtype=bool)
    lung_boxes = []
    for side in (-1.0, 1.0):
        lcy = rng.uniform(0.38, 0.5)
        lcx = cx + side * rng.uniform(0.14, 0.22)
        lay, lax = rng.uniform(0.2, 0.32), rng.uniform(0.09, 0.15)
        field = _superellipse(yy, xx, lcy, lcx, lay, lax, rng.uniform(1.8, 3.0))
        # diaphragm dome: cut the lower part by a random parabola
        dome = yy < lcy + lay * rng.uniform(0.5, 0.95) - rng.uniform(1, 4) * (xx - lcx) ** 2
        lungs |= field & dome & body
        lung_boxes.append((lcy, lcx, lay, lax))
    lung_soft = _soft(lungs, rng.uniform(1.0, 3.5))
    img -= gap * lung_soft

    heart = _superellipse(
        yy,
        xx,
        rng.uniform(0.55, 0.68),
        cx + rng.normal(0.03, 0.02),
        rng.uniform(0.1, 0.18),
        rng.uniform(0.09, 0.16),
        2.0,
    )
    img += rng.uniform(0.4, 0.9) * gap * _soft(heart & body, 3.0) * lung_soft
    spine = np.abs(xx - cx) < rng.uniform(0.03, 0.05)
    img += rng.uniform(0.1, 0.4) * gap * _soft(spine & body, 2.0)

    bone = np.zeros((rows, cols))
    if rng.random() < 0.9:  # ribs over the lung fields: posterior and anterior sets
        for curv_sign, strength in ((1.0, rng.uniform(0.05, 0.3)), (-1.0, rng.uniform(0.0, 0.15))):
            period = rng.uniform(0.05, 0.09)
            phase = rng.uniform(0, period)
            thick = rng.uniform(0.25, 0.5)
            for lcy, lcx, lay, lax in lung_boxes:
                curve = curv_sign * rng.uniform(1.0, 2.5) * (xx - lcx) ** 2
                t = ((yy + curve - phase) / period) % 1.0
                band = np.clip(1.0 - np.abs(t - 0.5) / (thick / 2), 0.0, 1.0)
                near = _soft((np.abs(xx - lcx) < lax * 1.4) & (np.abs(yy - lcy) < lay * 1.15), 4.0)
                bone += strength * gap * np.sqrt(band) * near
    if rng.random() < 0.7:  # clavicles
        for side in (-1.0, 1.0):
            _polyline(
                bone,
                rng,
                (rows * rng.uniform(0.12, 0.22), cols / 2 + side * rows * 0.05),
                np.pi / 2 - side * np.pi / 2 + rng.normal(0, 0.15),
                rows * 0.3,
                rows * 0.012,
                rng.uniform(0.3, 0.6) * gap,
                wiggle=0.05,
            )
    img += bone * body

    # vessels: branching lines from each hilum, and end-on dots (nodule mimics)
    vessels = np.zeros((rows, cols))
    for lcy, lcx, _lay, _lax in lung_boxes:
        hilum = (rows * (lcy + rng.normal(0, 0.03)), rows * (cx + (lcx - cx) * 0.45))
        for _ in range(int(rng.integers(4, 12))):
            _polyline(
                vessels,
                rng,
                hilum,
                rng.uniform(0, 2 * np.pi),
                rows * rng.uniform(0.05, 0.25),
                rng.uniform(0.4, 1.6) * (3.0 / spacing) * 0.3,
                rng.uniform(0.1, 0.35) * gap,
            )
    lung_px = np.argwhere(lungs)
    for _ in range(int(rng.integers(0, 12))):
        py, px = lung_px[int(rng.integers(len(lung_px)))]
        _blob(vessels, py, px, rng.uniform(1.0, 3.0) / spacing, rng.uniform(0.05, 0.3) * gap)
    img += vessels * lung_soft
    img += (
        gap
        * rng.uniform(0.02, 0.1)
        * ndimage.gaussian_filter(rng.normal(0, 1, (rows, cols)), rng.uniform(2, 8))
        * lung_soft
    )  # lung texture

    # devices: wires/tubes and ECG electrodes, high contrast, anywhere
    dev = np.zeros((rows, cols))
    for _ in range(int(rng.poisson(0.8))):
        _polyline(
            dev,
            rng,
            (rng.uniform(0, rows), rng.uniform(0, cols)),
            rng.uniform(0, 2 * np.pi),
            rows * rng.uniform(0.2, 0.8),
            rng.uniform(0.5, 2.5),
            rng.uniform(0.3, 1.5) * gap,
            wiggle=0.08,
        )
    for _ in range(int(rng.poisson(0.6))):
        cy_, cx_ = rng.uniform(0.1, 0.9) * rows, rng.uniform(0.1, 0.9) * cols
        r_ = rng.uniform(3.0, 8.0) / spacing
        ring = np.zeros((rows, cols))
        _blob(ring, cy_, cx_, r_, 1.0)
        inner = np.zeros((rows, cols))
        _blob(inner, cy_, cx_, r_ * 0.6, 1.0)
        dev += rng.uniform(0.5, 1.5) * gap * np.clip(ring - inner, 0, None)
    img += dev

    mask = np.zeros((rows, cols), dtype=bool)
    centre: tuple[float, float] | None = None
    diam = 0.0
    con = 0.0
    if nodule:
        diam = float(np.exp(rng.uniform(np.log(diameter_mm[0]), np.log(diameter_mm[1]))))
        con = float(rng.uniform(*contrast))
        radius_px = diam / 2 / spacing
        inner_lung = ndimage.binary_erosion(lungs, iterations=max(1, int(radius_px * 0.7)))
        cand = np.argwhere(inner_lung if inner_lung.any() else lungs)
        py, px = cand[int(rng.integers(len(cand)))]
        cy_, cx_ = float(py) + rng.uniform(-0.5, 0.5), float(px) + rng.uniform(-0.5, 0.5)
        centre = (cy_, cx_)
        gy, gx = np.mgrid[0:rows, 0:cols]
        mask = ((gy - cy_) ** 2 + (gx - cx_) ** 2) <= max(radius_px, 0.5) ** 2
        nod = np.zeros((rows, cols))
        _blob(nod, cy_, cx_, radius_px, con * gap)
        img += nod

    # acquisition: blur, transfer curve, noise, quantisation, photometric, header window
    img = ndimage.gaussian_filter(img, rng.uniform(0.0, 1.5))
    lo, hi = float(img.min()), float(img.max())
    signal = (img - lo) / max(hi - lo, 1e-6)
    signal = signal ** rng.uniform(0.6, 1.6)
    noise_level = rng.uniform(0.002, 0.03)
    noise = rng.normal(0, 1, signal.shape)
    if rng.random() < 0.5:
        noise = ndimage.gaussian_filter(noise, rng.uniform(0.5, 1.2)) * 2.0
    signal = np.clip(signal + noise_level * noise * np.sqrt(0.3 + signal), 0.0, 1.0)
    bits = int(rng.integers(8, 17))
    stored, _, _ = _quantise(signal, rng, bits)
    photometric = "MONOCHROME2"
    if rng.random() < 0.5:
        photometric = "MONOCHROME1"
        stored = (2**bits - 1 - stored.astype(np.int64)).astype(np.uint16)
    window = _header_window(stored, rng) if rng.random() < 0.4 else None
    header = pseudo_header(
        bits=bits, photometric=photometric, window=window, pixel_spacing=(spacing, spacing)
    )
    return RandomRadiograph(
        stored=stored,
        header=header,
        label=int(nodule),
        mask=mask,
        centre=centre,
        diameter_mm=diam,
        contrast=con,
        pixel_spacing=(spacing, spacing),
    )


# --------------------------------------------------------------------- CT slices


def random_ct_slice(
    rng: np.random.Generator,
    *,
    n_lesions: int,
    diameter_mm: tuple[float, float] = (3.0, 30.0),
    max_matrix: int = 320,
) -> RandomCTSlice:
    """One axial CT slice in HU with ``n_lesions`` lesions (lung and solid organs).

    The lesion's cross-section on this slice follows from a random ellipsoid, a random
    position of the slice through it and the slice thickness (partial volume: the
    slab average over 5 planes).
    """
    n = int(rng.integers(160, max_matrix + 1))
    fov = float(rng.uniform(280.0, 480.0))
    spacing = fov / n
    thickness = float(rng.uniform(1.0, 5.0))
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) * spacing  # mm
    c = fov / 2
    level = "chest" if rng.random() < 0.55 else "abdomen"
    hu = np.full((n, n), -1000.0)
    by, bx = c + rng.normal(0, 10), c + rng.normal(0, 10)
    ay, ax = rng.uniform(80, 150), rng.uniform(120, 200)
    p = rng.uniform(1.8, 3.0)
    body = _superellipse(yy, xx, by, bx, ay, ax, p)
    fat_t = rng.uniform(5, 30)
    inner = _superellipse(yy, xx, by, bx, ay - fat_t, ax - fat_t, p)
    hu[body] = rng.uniform(-120, -80)
    hu[inner] = rng.uniform(30, 55)  # muscle / soft tissue
    # table (or headrest) under the body: a curved bright band
    if rng.random() < 0.8:
        ty = by + ay + rng.uniform(5, 25)
        table = (np.abs(yy - ty - 0.0015 * (xx - bx) ** 2) < rng.uniform(2, 6)) & ~body
        hu[table] = rng.uniform(-200, 300)
    # bones: spine and, on chest slices, a ring of ribs
    sy = by + ay * rng.uniform(0.45, 0.7)
    spine = _superellipse(yy, xx, sy, bx, rng.uniform(12, 22), rng.uniform(12, 22), 2.0)
    hu[spine & inner] = rng.uniform(250, 900)
    organs = np.zeros((n, n), dtype=bool)
    lungs = np.zeros((n, n), dtype=bool)
    if level == "chest":
        for side in (-1.0, 1.0):
            lcx = bx + side * ax * rng.uniform(0.35, 0.5)
            lung = _superellipse(
                yy,
                xx,
                by - rng.uniform(0, 15),
                lcx,
                ay * rng.uniform(0.55, 0.8),
                ax * rng.uniform(0.3, 0.42),
                rng.uniform(1.8, 2.6),
            )
            lungs |= lung & inner & ~spine
        hu[lungs] = rng.uniform(-900, -780)
        for _ in range(int(rng.integers(8, 20))):  # ribs around the body
            ang = rng.uniform(0, 2 * np.pi)
            ry = by + (ay - fat_t - 8) * np.sin(ang)
            rx = bx + (ax - fat_t - 8) * np.cos(ang)
            rib = _superellipse(yy, xx, ry, rx, rng.uniform(3, 6), rng.uniform(3, 8), 2.0)
            hu[rib & inner & ~lungs] = rng.uniform(300, 900)
        heart = _superellipse(
            yy,
            xx,
            by + rng.normal(0, 10),
            bx + rng.uniform(-5, 25),
            rng.uniform(35, 55),
            rng.uniform(40, 65),
            2.0,
        )
        hu[heart & inner & ~lungs] = rng.uniform(30, 60)
        # vessels in the lung: round cross-sections and short branches (lesion mimics)
        vessel = np.zeros((n, n))
        lung_px = np.argwhere(lungs)
        if len(lung_px):
            for _ in range(int(rng.integers(15, 50))):
                py, px = lung_px[int(rng.integers(len(lung_px)))]
                _blob(vessel, py, px, rng.uniform(0.8, 4.0) / spacing, 1.0)
            for _ in range(int(rng.integers(3, 10))):
                py, px = lung_px[int(rng.integers(len(lung_px)))]
                _polyline(
                    vessel,
                    rng,
                    (float(py), float(px)),
                    rng.uniform(0, 2 * np.pi),
                    rng.uniform(5, 40) / spacing,
                    rng.uniform(0.5, 2.0) / spacing,
                    1.0,
                )
        vmask = np.clip(vessel, 0, 1) * lungs
        hu = hu * (1 - vmask) + vmask * rng.uniform(0, 60)
        organs = heart & inner & ~lungs
    else:
        liver = (
            _superellipse(
                yy,
                xx,
                by + rng.normal(-5, 10),
                bx - ax * rng.uniform(0.15, 0.4),
                ay * rng.uniform(0.45, 0.75),
                ax * rng.uniform(0.35, 0.6),
                rng.uniform(1.8, 2.6),
            )
            & inner
            & ~spine
        )
        hu[liver] = rng.uniform(40, 75)
        spleen = (
            _superellipse(
                yy,
                xx,
                by + rng.normal(0, 15),
                bx + ax * rng.uniform(0.4, 0.6),
                rng.uniform(20, 45),
                rng.uniform(15, 35),
                2.0,
            )
            & inner
            & ~liver
        )
        hu[spleen] = rng.uniform(35, 65)
        for _ in range(int(rng.integers(0, 6))):  # bowel gas
            gy_, gx_ = by + rng.normal(0, ay * 0.3), bx + rng.normal(0, ax * 0.3)
            gas = _superellipse(yy, xx, gy_, gx_, rng.uniform(5, 20), rng.uniform(5, 20), 2.0)
            hu[gas & inner & ~liver & ~spine] = rng.uniform(-950, -600)
        organs = (liver | spleen) & inner
        # vessels in the organs (enhanced or not): round and tubular
        vessel = np.zeros((n, n))
        org_px = np.argwhere(organs)
        if len(org_px):
            for _ in range(int(rng.integers(3, 15))):
                py, px = org_px[int(rng.integers(len(org_px)))]
                _blob(vessel, py, px, rng.uniform(1.5, 6.0) / spacing, 1.0)
        vmask = np.clip(vessel, 0, 1) * organs
        hu = hu + vmask * rng.uniform(-20, 120)
    aorta = _superellipse(
        yy,
        xx,
        sy - rng.uniform(25, 40),
        bx + rng.uniform(-10, 20),
        rng.uniform(9, 16),
        rng.uniform(9, 16),
        2.0,
    )
    hu[aorta & inner] = rng.uniform(30, 300)
    # devices: metal clips / wires (very bright, small)
    for _ in range(int(rng.poisson(0.3))):
        py, px = rng.uniform(0.3, 0.7, 2) * n
        clip = np.zeros((n, n))
        _blob(clip, py, px, rng.uniform(1, 3) / spacing, 1.0)
        hu += clip * rng.uniform(800, 2500)

    # lesions
    mask = np.zeros((n, n), dtype=bool)
    host = lungs if level == "chest" and lungs.any() else organs
    for _ in range(n_lesions):
        if not host.any():
            break
        d_mm = float(np.exp(rng.uniform(np.log(diameter_mm[0]), np.log(diameter_mm[1]))))
        semi = np.array(
            [d_mm / 2 * rng.uniform(0.8, 1.25), d_mm / 2, d_mm / 2 * rng.uniform(0.8, 1.25)]
        )
        zc = rng.uniform(-0.5, 0.5) * min(semi[0], thickness)  # slice centre vs lesion centre
        r_px = semi[1] / spacing
        inner_host = ndimage.binary_erosion(host, iterations=max(1, int(r_px * 0.6)))
        cand = np.argwhere(inner_host if inner_host.any() else host)
        py, px = cand[int(rng.integers(len(cand)))]
        cy_, cx_ = (py + rng.uniform(-0.5, 0.5)) * spacing, (px + rng.uniform(-0.5, 0.5)) * spacing
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy_, xx - cx_
        u = dy * np.cos(theta) + dx * np.sin(theta)
        v = -dy * np.sin(theta) + dx * np.cos(theta)
        frac = np.zeros((n, n))
        for dz in np.linspace(-thickness / 2, thickness / 2, 5):
            frac += ((zc + dz) / semi[0]) ** 2 + (u / semi[1]) ** 2 + (v / semi[2]) ** 2 <= 1.0
        frac /= 5.0
        core = (zc / semi[0]) ** 2 + (u / semi[1]) ** 2 + (v / semi[2]) ** 2 <= 1.0
        if not core.any():
            continue
        if host is lungs:
            target = rng.uniform(-100, 60) if rng.random() < 0.85 else rng.uniform(-500, -200)
            hu = hu * (1 - frac) + target * frac
        else:
            delta = rng.choice([-1.0, 1.0], p=[0.75, 0.25]) * rng.uniform(10, 80)
            hu = hu + delta * frac * organs
        mask |= core

    # acquisition: blur, correlated noise, stored encoding
    hu = ndimage.gaussian_filter(hu, rng.uniform(0.3, 1.2))
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (n, n)), rng.uniform(0.5, 1.2))
    noise /= max(float(noise.std()), 1e-6)
    hu = hu + noise * rng.uniform(5, 30) * (hu > -950)
    if rng.random() < 0.5:  # unsigned, intercept -1024
        stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.int32)
        header = pseudo_header(bits=12, intercept=-1024.0, pixel_spacing=(spacing, spacing))
    else:  # signed 16 bit, intercept 0
        stored = np.clip(np.rint(hu), -2048, 3071).astype(np.int32)
        header = pseudo_header(bits=16, signed=True, pixel_spacing=(spacing, spacing))
    header.SliceThickness = round(thickness, 3)
    return RandomCTSlice(
        stored=stored,
        header=header,
        mask=mask,
        pixel_spacing=(spacing, spacing),
        slice_thickness=thickness,
    )
