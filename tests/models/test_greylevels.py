"""Grey levels from the data: header VOI, BitsStored, robust percentiles, in that order."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

import models.preprocess as mp
from models.package import InputSpec, ManifestError, parse_manifest
from models.preprocess import bits_window, image_to_unit, percentile_window, voi_to_unit


def _header(bits: int, photometric: str = "MONOCHROME2", **extra: object) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.BitsStored = bits
    ds.PixelRepresentation = 0
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _radiograph(seed: int = 0) -> np.ndarray:
    """A smooth 0..1 scene with a bright disc: what a detector would measure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:200, 0:240] / 200.0
    scene = 0.3 + 0.4 * np.exp(-((x - 0.6) ** 2 + (y - 0.5) ** 2) / 0.1)
    scene += 0.2 * (((x - 0.4) ** 2 + (y - 0.4) ** 2) < 0.01)
    return np.asarray(np.clip(scene + rng.normal(0, 0.01, scene.shape), 0, 1))


def _store(scene: np.ndarray, bits: int, photometric: str) -> np.ndarray:
    top = 2**bits - 1
    stored = np.rint(scene * top).astype(np.int64)
    return np.asarray(top - stored if photometric == "MONOCHROME1" else stored)


@pytest.mark.parametrize(
    ("bits", "photometric"),
    [
        (8, "MONOCHROME2"),
        (10, "MONOCHROME2"),
        (14, "MONOCHROME2"),
        (16, "MONOCHROME2"),
        (12, "MONOCHROME1"),
        (16, "MONOCHROME1"),
    ],
)
def test_percentiles_make_bit_depth_and_photometric_irrelevant(bits: int, photometric: str) -> None:
    scene = _radiograph()
    ref = image_to_unit(
        _store(scene, 12, "MONOCHROME2"), _header(12), sources=["header", "percentile"]
    )
    ds = _header(bits, photometric)
    unit = image_to_unit(_store(scene, bits, photometric), ds, sources=["header", "percentile"])
    assert float(np.abs(unit - ref).max()) < 0.02  # an 8-bit step is 1/255 of the range
    # the old fixed window (C2048/W4096) is the bug this replaces
    fixed = image_to_unit(_store(scene, bits, photometric), ds, (2048.0, 4096.0))
    if bits != 12:
        assert float(np.abs(fixed - ref).max()) > 0.2


def test_the_header_window_wins_when_present() -> None:
    stored = _store(_radiograph(), 12, "MONOCHROME2")
    ds = _header(12, WindowCenter=1000, WindowWidth=500)
    unit, source = voi_to_unit(stored.astype(np.float32), ds, ["header", "percentile"])
    assert source == "header"
    np.testing.assert_allclose(unit, mp.apply_window(stored.astype(np.float32), 1000, 500))
    _, source = voi_to_unit(stored.astype(np.float32), _header(12), ["header", "percentile"])
    assert source == "percentile"
    _, source = voi_to_unit(stored.astype(np.float32), _header(12), ["header", "bits"])
    assert source == "bits"


def test_bits_window_covers_the_stored_range_through_the_rescale() -> None:
    assert bits_window(_header(12)) == (2048.0, 4096.0)  # the usual full-range window
    ds = _header(12, RescaleSlope=1, RescaleIntercept=-1024)
    c, w = bits_window(ds)  # type: ignore[misc]
    assert (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2) == (-1024.0, 3071.0)
    signed = _header(16, PixelRepresentation=1)
    c, w = bits_window(signed)  # type: ignore[misc]
    assert (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2) == (-32768.0, 32767.0)
    assert bits_window(Dataset()) is None


def test_percentile_window_maps_the_percentiles_to_0_and_1() -> None:
    values = np.arange(1000, dtype=np.float32)
    c, w = percentile_window(values, (1.0, 99.0))  # type: ignore[misc]
    unit = mp.apply_window(values, c, w)
    lo, hi = np.percentile(values, [1.0, 99.0])
    assert unit[values <= lo].max() == 0.0 and unit[values >= hi].min() == 1.0
    assert percentile_window(np.full(50, 7.0)) is None  # flat: no window
    flat, source = voi_to_unit(np.full((4, 4), 7.0, np.float32), Dataset(), ["percentile"])
    assert source == "minmax" and not flat.any()


def test_manifest_declares_and_validates_the_grey_levels() -> None:
    spec = InputSpec(size=(64, 64), grey_levels=["header", "percentile"], percentiles=(1, 99))
    frame = _store(_radiograph(), 16, "MONOCHROME1")
    x, _ = spec.prepare(frame, _header(16, "MONOCHROME1"))
    y, _ = mp.preprocess_frame(
        frame,
        _header(16, "MONOCHROME1"),
        (64, 64),
        sources=["header", "percentile"],
        percentiles=(1, 99),
    )
    np.testing.assert_array_equal(x, y)
    base = {
        "model": {
            "name": "m",
            "version": "1",
            "device_uid": "1.2.3",
            "task": "classification",
            "arch": "resnet18",
        },
        "output": {
            "labels": [{"name": "x", "code": {"value": "1", "scheme": "SCT", "meaning": "x"}}]
        },
    }
    for bad, key in (
        ({"grey_levels": ["manifest"]}, "needs window_center"),
        ({"grey_levels": ["guess"]}, "input.grey_levels"),
        ({"grey_levels": []}, "at least one"),
        ({"percentiles": [99, 1]}, "percentiles"),
    ):
        with pytest.raises(ManifestError, match=key):
            parse_manifest({**base, "input": {"size": [64, 64], **bad}})


def test_every_public_name_of_the_old_module_is_still_importable() -> None:
    for name in (
        "Interpolation",
        "PixelDecodeError",
        "SpatialMap",
        "apply_window",
        "decode_frames",
        "image_to_unit",
        "modality_lut",
        "normalise",
        "pixel_spacing",
        "preprocess_frame",
        "slice_spacing",
        "sort_series",
        "to_channels",
        "window_from_dataset",
    ):
        assert hasattr(mp, name), name
