"""Preprocessing: decoding of every bundled encoding, grey-level steps, geometry."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from models.preprocess import (
    Interpolation,
    PixelDecodeError,
    SpatialMap,
    apply_window,
    decode_frames,
    image_to_unit,
    modality_lut,
    pixel_spacing,
    preprocess_frame,
    slice_spacing,
    sort_series,
    to_channels,
    window_from_dataset,
)
from tests.models.helpers import make_image

LOSSLESS = [  # compressed file, uncompressed twin
    ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"),  # JPEG lossless process 14 vs RLE
    ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm"),  # JPEG 2000 (reversible) vs RLE
    ("SC_rgb_rle_2frame.dcm", "SC_rgb_rle.dcm"),
    ("SC_rgb_rle_16bit.dcm", "SC_rgb_rle.dcm"),  # compared after scaling by bit depth
    ("SC_rgb_rle_32bit.dcm", "SC_rgb_rle.dcm"),
    ("rtdose_rle.dcm", "rtdose.dcm"),
    ("rtdose_rle_1frame.dcm", "rtdose_1frame.dcm"),
]
LOSSY = [  # compressed file, twin, minimum PSNR in dB over the first frame
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 35.0),
    ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_rle.dcm", 45.0),
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_rle.dcm", 25.0),
    ("SC_rgb_dcmtk_+eb+cy+n2.dcm", "SC_rgb_rle.dcm", 35.0),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_rle.dcm", 25.0),
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_rle.dcm", 35.0),
    ("SC_rgb_dcmtk_+eb+cy+s4.dcm", "SC_rgb_rle.dcm", 35.0),
    ("SC_rgb_jpeg_lossy_gdcm.dcm", "SC_rgb_rle.dcm", 25.0),
    ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", 40.0),
    ("SC_rgb_jls_lossy_sample.dcm", "SC_rgb_rle.dcm", 40.0),
    ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 30.0),
    ("SC_rgb_jpeg.dcm", "SC_rgb_jpeg_dcmd.dcm", 45.0),  # dcmd = DCMTK-decompressed copy
    ("JPEG2000.dcm", "JPGExtended.dcm", 25.0),  # same image, two lossy codecs
]
# known-corrupt streams: must fail with a one-line PixelDecodeError, never crash
MALFORMED = {"JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"}


def _read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(str(get_testdata_file(name)))


def _unit(name: str) -> np.ndarray:
    ds = _read(name)
    arr = np.asarray(decode_frames(ds), dtype=np.float64)
    return np.asarray(arr / (2 ** int(ds.BitsStored) - 1), dtype=np.float64)


@pytest.mark.parametrize(("compressed", "twin"), LOSSLESS, ids=[p[0] for p in LOSSLESS])
def test_lossless_decodes_exactly_to_twin(compressed: str, twin: str) -> None:
    a, b = decode_frames(_read(compressed)), decode_frames(_read(twin))
    if a.dtype.itemsize != b.dtype.itemsize:  # 16/32-bit copies of an 8-bit image
        a, b = _unit(compressed), _unit(twin)
    n = min(len(a), len(b))
    np.testing.assert_array_equal(a[:n], b[:n])


@pytest.mark.parametrize(("compressed", "twin", "psnr_min"), LOSSY, ids=[p[0] for p in LOSSY])
def test_lossy_decodes_close_to_twin(compressed: str, twin: str, psnr_min: float) -> None:
    a = decode_frames(_read(compressed))[0].astype(np.float64)
    b = decode_frames(_read(twin))[0].astype(np.float64)
    assert a.shape == b.shape
    peak = float(b.max() - b.min())
    mse = float(np.mean((a - b) ** 2))
    psnr = 10 * np.log10(peak**2 / mse) if mse else np.inf
    assert psnr >= psnr_min


def _compressed_files() -> list[str]:
    out = []
    folder = Path(str(get_testdata_file("MR_small.dcm"))).parent  # local files only, no download
    for path in sorted(folder.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
            ts = ds.file_meta.TransferSyntaxUID
        except Exception:
            continue
        if "PixelData" in ds and ts.is_compressed and not ts.is_deflated:
            out.append(os.path.basename(path))
    return sorted(out)


def test_every_bundled_compressed_file_is_covered_and_decodes() -> None:
    files = _compressed_files()
    assert len(files) >= 30  # the bundled set did not vanish
    twins = {p[0] for p in LOSSLESS} | {p[0] for p in LOSSY}
    for name in files:
        ds = _read(name)
        if name in MALFORMED:
            with pytest.raises(PixelDecodeError) as info:
                decode_frames(ds)
            assert "\n" not in str(info.value)
            continue
        arr = decode_frames(ds)  # every other file decodes
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        assert arr.shape[:3] == (frames, ds.Rows, ds.Columns), name
        assert arr.max() > arr.min(), name
        if name not in twins:
            continue  # no uncompressed twin bundled: decoding with the right shape is all


def test_no_pixel_data_is_a_decode_error() -> None:
    ds = _read("MR_small.dcm")
    del ds.PixelData
    with pytest.raises(PixelDecodeError, match="no pixel data"):
        decode_frames(ds)


def test_rescale_gives_hounsfield_units() -> None:
    ds = _read("CT_small.dcm")
    raw = decode_frames(ds)[0]
    hu = modality_lut(raw, ds)
    np.testing.assert_allclose(
        hu, raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept), rtol=1e-6
    )


def test_window_maps_linear_range_to_unit() -> None:
    values = np.array([-1000.0, 40.0 - 200, 40.0, 40 + 200, 3000.0], dtype=np.float32)
    out = apply_window(values, 40.0, 400.0)
    assert out[0] == 0.0 and out[-1] == 1.0
    assert out[2] == pytest.approx(0.5, abs=0.01)
    assert out[1] == pytest.approx(0.0, abs=0.01) and out[3] == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="width"):
        apply_window(values, 40.0, 0.5)


def test_window_from_dataset_takes_first_of_multivalue() -> None:
    ds = make_image(np.zeros((4, 4)), WindowCenter=[40, 400], WindowWidth=[400, 2000])
    assert window_from_dataset(ds) == (40.0, 400.0)
    assert window_from_dataset(make_image(np.zeros((4, 4)))) is None


def test_monochrome1_is_inverted() -> None:
    pix = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    m2 = image_to_unit(pix, make_image(pix, photometric="MONOCHROME2"))
    m1 = image_to_unit(pix, make_image(pix, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2)
    assert m1[0, 0] == 1.0 and m1[1, 1] == 0.0  # low value = bright in MONOCHROME1


def test_manifest_window_wins_over_dataset_window() -> None:
    pix = np.array([[0, 1000]], dtype=np.uint16)
    ds = make_image(pix, WindowCenter=2000, WindowWidth=1000)
    np.testing.assert_allclose(image_to_unit(pix, ds), [[0.0, 0.0]])
    np.testing.assert_allclose(image_to_unit(pix, ds, window=(250.0, 500.0)), [[0.0, 1.0]])


def test_channels_grey_repeat_and_rgb_luma() -> None:
    grey = np.ones((3, 5), dtype=np.float32)
    assert to_channels(grey, 3).shape == (3, 3, 5)
    rgb = np.zeros((3, 5, 3), dtype=np.float32)
    rgb[..., 1] = 1.0
    assert to_channels(rgb, 1)[0, 0, 0] == pytest.approx(0.587)
    assert to_channels(rgb, 3)[1].min() == 1.0


def _gaussian(shape: tuple[int, int], r: float, c: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.asarray(np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2)), np.float32)


SHAPES = [
    ((512, 512), (224, 224)),
    ((375, 231), (64, 96)),
    ((97, 143), (256, 128)),
    ((1001, 333), (224, 224)),
    ((64, 64), (64, 64)),
]


@pytest.mark.parametrize(("src", "dst"), SHAPES)
def test_heatmap_peak_lands_back_on_its_pixel(src: tuple[int, int], dst: tuple[int, int]) -> None:
    smap = SpatialMap(src, dst)
    rng = np.random.default_rng(sum(src) + sum(dst))
    for _ in range(5):
        r, c = int(rng.integers(0, src[0])), int(rng.integers(0, src[1]))
        mr, mc = smap.forward_point(r, c)
        assert smap.inverse_point(mr, mc) == pytest.approx((r, c))
        heat = _gaussian(dst, mr, mc, sigma=2.0)  # a model-space heatmap peaking there
        back = smap.inverse(heat)
        assert back.shape == src
        peak = np.unravel_index(int(np.argmax(back)), src)
        assert (int(peak[0]), int(peak[1])) == (r, c)


@pytest.mark.parametrize(("src", "dst"), SHAPES)
def test_bright_pixel_survives_forward_resampling(
    src: tuple[int, int], dst: tuple[int, int]
) -> None:
    smap = SpatialMap(src, dst)
    img = np.zeros(src, dtype=np.float32)
    r, c = src[0] // 3, (2 * src[1]) // 3
    img[r, c] = 1.0
    small = smap.forward(img)
    assert small.shape == dst
    mr, mc = smap.forward_point(r, c)
    pr, pc = np.unravel_index(int(np.argmax(small)), dst)
    assert abs(pr - mr) <= 1.0 and abs(pc - mc) <= 1.0
    assert small.sum() == pytest.approx(img.sum() * np.prod(dst) / np.prod(src), rel=0.1)


def test_spatial_map_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="src_shape"):
        SpatialMap((0, 4), (4, 4))
    with pytest.raises(ValueError, match="spatial shape"):
        SpatialMap((4, 4), (2, 2)).forward(np.zeros((5, 4)))


def test_preprocess_frame_layout_and_normalisation() -> None:
    pix = np.arange(30 * 40, dtype=np.uint16).reshape(30, 40)
    x, smap = preprocess_frame(pix, make_image(pix), (16, 24), channels=3, mean=0.5, std=0.25)
    assert x.shape == (3, 16, 24) and x.dtype == np.float32
    assert smap.src_shape == (30, 40)
    # min..max → [0, 1] → (x - 0.5) / 0.25: about [-2, 2], edges softened by resampling
    assert x.min() == pytest.approx(-2.0, abs=0.1) and x.max() == pytest.approx(2.0, abs=0.1)


def test_sort_series_by_position_along_normal() -> None:
    pix = np.zeros((4, 4))
    zs = [5.0, -2.5, 2.5, 0.0]
    shuffled = [make_image(pix, z=z, instance_number=i) for i, z in enumerate([3, 1, 4, 2])]
    for ds, z in zip(shuffled, zs, strict=True):
        ds.ImagePositionPatient = [0.0, 0.0, z]
    ordered = sort_series(shuffled)
    assert [float(ds.ImagePositionPatient[2]) for ds in ordered] == sorted(zs)
    assert slice_spacing(ordered) == pytest.approx(2.5)


def test_sort_series_oblique_normal() -> None:
    # rows along x, columns along (0, cos, sin): normal is (0, -sin, cos)
    a = np.deg2rad(30)
    iop = [1, 0, 0, 0, float(np.cos(a)), float(np.sin(a))]
    normal = np.array([0, -np.sin(a), np.cos(a)])
    images = []
    for d in [3.0, 0.0, 6.0]:
        ds = make_image(np.zeros((2, 2)))
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = list(map(float, normal * d + np.array([5.0, 1.0, 0.0])))
        images.append(ds)
    ordered = sort_series(images)
    dists = [float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) for ds in ordered]
    assert dists == sorted(dists)
    assert slice_spacing(ordered) == pytest.approx(3.0)


def test_sort_series_falls_back_to_instance_number() -> None:
    images = [make_image(np.zeros((2, 2)), instance_number=n, geometry=False) for n in (3, 1, 2)]
    assert [int(ds.InstanceNumber) for ds in sort_series(images)] == [1, 2, 3]
    assert slice_spacing(sort_series(images)) is None


def test_pixel_spacing() -> None:
    assert pixel_spacing(make_image(np.zeros((2, 2)), spacing=(0.7, 0.8))) == (0.7, 0.8)
    ds = make_image(np.zeros((2, 2)))
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.2, 0.2]
    assert pixel_spacing(ds) == (0.2, 0.2)


def test_palette_colour_goes_through_its_lut() -> None:
    ds = _read("examples_palette.dcm")
    idx = decode_frames(ds)[0]
    rgb = image_to_unit(idx, ds)
    assert rgb.shape == (*idx.shape, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    # equal indices give equal colours, and the LUT is not the identity on grey
    i = int(idx.flat[idx.size // 2])
    sel = idx == i
    assert np.ptp(rgb[sel], axis=0).max() == 0.0
    assert not np.allclose(rgb[..., 0], rgb[..., 2])


@given(
    src=st.tuples(st.integers(1, 2000), st.integers(1, 2000)),
    dst=st.tuples(st.integers(1, 1024), st.integers(1, 1024)),
    frac=st.tuples(st.floats(0, 1), st.floats(0, 1)),
)
def test_point_mapping_round_trips(
    src: tuple[int, int], dst: tuple[int, int], frac: tuple[float, float]
) -> None:
    smap = SpatialMap(src, dst)
    r, c = frac[0] * (src[0] - 1), frac[1] * (src[1] - 1)
    assert smap.inverse_point(*smap.forward_point(r, c)) == pytest.approx((r, c), abs=1e-6)


@given(n_in=st.integers(1, 300), n_out=st.integers(1, 300))
def test_resampling_preserves_constant_images(n_in: int, n_out: int) -> None:
    smap = SpatialMap((n_in, 7), (n_out, 5))
    kinds: tuple[Interpolation, ...] = ("nearest", "linear", "cubic")
    for kind in kinds:
        out = smap.forward(np.full((n_in, 7), 3.0, dtype=np.float32), kind)
        np.testing.assert_allclose(out, 3.0, rtol=1e-5)


def test_voi_lut_functions() -> None:
    v = np.array([-100.0, 0.0, 100.0], dtype=np.float32)
    sig = apply_window(v, 0.0, 100.0, "SIGMOID")
    assert sig[1] == pytest.approx(0.5) and sig[0] < 0.05 and sig[2] > 0.95
    exact = apply_window(v, 0.0, 100.0, "LINEAR_EXACT")
    np.testing.assert_allclose(exact, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(apply_window(v, 0.0, 1.0), [0.0, 1.0, 1.0])  # threshold
    with pytest.raises(ValueError, match="VOI LUT function"):
        apply_window(v, 0.0, 100.0, "CUBIC")
    ds = make_image(np.zeros((1, 3)), WindowCenter=0, WindowWidth=100, VOILUTFunction="SIGMOID")
    pix = np.array([[0, 50, 100]], dtype=np.uint16)
    assert image_to_unit(pix, ds)[0, 0] == pytest.approx(0.5)


def test_voi_lut_sequence_is_applied_when_no_window() -> None:
    from pydicom.dataset import Dataset as Item

    pix = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    ds = make_image(pix)
    item = Item()
    item.LUTDescriptor = [4, 0, 8]  # 4 entries from value 0, 8-bit output
    item.LUTData = [0, 255, 0, 255]  # not monotonic: only a LUT can give this
    ds.VOILUTSequence = [item]
    np.testing.assert_allclose(image_to_unit(pix, ds), [[0.0, 1.0, 0.0, 1.0]])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    src=st.tuples(st.integers(3, 97), st.integers(3, 97)),
    dst=st.tuples(st.integers(3, 64), st.integers(3, 64)),
)
def test_background_winning_on_the_model_grid_wins_after_linear_inverse(
    seed: int, src: tuple[int, int], dst: tuple[int, int]
) -> None:
    """The pipeline skips resampling slices whose background wins everywhere; this is why
    that is exact: linear weights are non-negative, so the inequality survives."""
    rng = np.random.default_rng(seed)
    fg = rng.uniform(0.0, 0.49, size=(2, *dst)).astype(np.float32)
    probs = np.concatenate([1.0 - fg.max(axis=0, keepdims=True), fg])
    back = SpatialMap(src, dst).inverse(probs, "linear")
    assert not np.argmax(back, axis=0).any()


def test_resample_matrices_are_cached_and_read_only() -> None:
    a = SpatialMap((40, 50), (16, 16)).forward(np.ones((40, 50), np.float32))
    b = SpatialMap((40, 50), (16, 16)).forward(np.ones((40, 50), np.float32))
    np.testing.assert_array_equal(a, b)
    from models.preprocess.resample import _resample_matrix

    m = _resample_matrix(40, 16, "linear")
    assert m is _resample_matrix(40, 16, "linear")
    with pytest.raises(ValueError):
        m[0, 0] = 2.0


def test_implausible_dimensions_are_refused_before_decoding() -> None:
    """A damaged header must not make a decoder allocate many GiB (fuzzed files did)."""
    from pydicom.data import get_testdata_file

    from models.preprocess import MAX_DECODED_BYTES, PixelDecodeError

    ds = pydicom.dcmread(str(get_testdata_file("MR_small_RLE.dcm")))
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    with pytest.raises(PixelDecodeError, match="implausible"):
        decode_frames(ds)
    assert MAX_DECODED_BYTES < 65535 * 65535 * 1000 * 2
