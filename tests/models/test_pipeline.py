"""Predictor: series in, InferenceResult out, in original pixel space."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from models.backends.fake import FakeBackend
from models.package import ModelPackage
from models.pipeline import VOLUME, BackendCache, Predictor
from tests.models.helpers import make_image

ROOT = Path(__file__).resolve().parents[2]


def _disk(shape: tuple[int, int], r: int, c: int, radius: float, value: int) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    img = np.full(shape, 100, dtype=np.uint16)
    img[(yy - r) ** 2 + (xx - c) ** 2 <= radius**2] = value
    return img


@pytest.mark.parametrize("shape", [(256, 256), (301, 187)])
def test_classification_heatmap_peak_lands_on_the_nodule(
    fake_cls_package: ModelPackage, shape: tuple[int, int]
) -> None:
    r, c = shape[0] // 3, (2 * shape[1]) // 3
    nodule = make_image(_disk(shape, r, c, 12, 3000), z=1.0)
    plain = make_image(_disk(shape, r, c, 0, 100), z=0.0)
    result = Predictor(fake_cls_package, "fake").predict([nodule, plain])
    assert result.source_sop_instance_uids == [plain.SOPInstanceUID, nodule.SOPInstanceUID]
    (finding,) = result.findings
    assert finding.positive and finding.label == "nodule"
    assert finding.finding_type.value == "27925004"
    assert finding.source_sop_instance_uids == (nodule.SOPInstanceUID,)
    assert set(result.heatmaps) == {nodule.SOPInstanceUID}
    heat = result.heatmaps[nodule.SOPInstanceUID]
    assert heat.shape == shape and heat.dtype == np.float32
    assert heat.min() == 0.0 and heat.max() == 1.0
    assert finding.peak is not None
    uid, pr, pc = finding.peak
    assert uid == nodule.SOPInstanceUID
    # the fake CAM sits on a 1/4 grid of a 64x64 input: within one CAM cell of the centre
    cell = max(shape) / 16
    assert abs(pr - r) <= cell and abs(pc - c) <= cell
    assert set(result.timings) == {"load", "preprocess", "inference", "postprocess"}


def test_negative_study_has_no_heatmap(fake_cls_package: ModelPackage) -> None:
    img = make_image(np.full((64, 64), 100, dtype=np.uint16))
    result = Predictor(fake_cls_package, "fake").predict([img])
    assert not result.positive and result.heatmaps == {}


def test_segmentation_mask_and_volume(fake_seg_package: ModelPackage) -> None:
    shape, spacing, dz = (120, 90), (0.5, 0.8), 2.5
    images = []
    expected_voxels = 0
    for k in range(5):
        radius = 0 if k in (0, 4) else 10 + 3 * k
        img = _disk(shape, 60, 45, radius, 3000) if radius else np.full(shape, 100, np.uint16)
        if radius:
            expected_voxels += int((img == 3000).sum())
        images.append(
            make_image(img, z=k * dz, spacing=spacing, WindowCenter=1550, WindowWidth=2900)
        )
    shuffled = [images[i] for i in (3, 0, 4, 1, 2)]
    result = Predictor(fake_seg_package, FakeBackend(), batch_size=2).predict(shuffled)
    assert result.mask is not None and result.mask.shape == (5, *shape)
    assert result.mask.dtype == np.uint8
    assert result.source_sop_instance_uids == [ds.SOPInstanceUID for ds in images]
    (finding,) = result.findings
    assert finding.segment_number == 1 and result.segments[0].number == 1
    assert finding.source_sop_instance_uids == tuple(ds.SOPInstanceUID for ds in images[1:4])
    assert finding.positive
    (volume,) = finding.measurements
    assert volume.name == VOLUME and volume.unit.value == "mm3"
    voxel = spacing[0] * spacing[1] * dz
    # the mask is mapped back from a 64x64 grid: boundary pixels may flip
    assert volume.value == pytest.approx(expected_voxels * voxel, rel=0.1)
    assert volume.value == pytest.approx(float((result.mask == 1).sum()) * voxel)
    # mask frames follow the sorted order: empty first and last slices
    assert result.mask[0].max() == 0 and result.mask[-1].max() == 0 and result.mask[2].max() == 1


class _Recording(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.sizes.append(int(batch.shape[0]))
        return super()._run(batch)


def test_batching_is_invisible_in_the_result(fake_cls_package: ModelPackage) -> None:
    rng = np.random.default_rng(0)
    images = [
        make_image(rng.integers(0, 4000, (50, 70)).astype(np.uint16), z=float(z)) for z in range(7)
    ]
    runs = []
    for batch_size in (1, 3, 8):
        backend = _Recording()
        result = Predictor(fake_cls_package, backend, batch_size=batch_size).predict(images)
        assert backend.calls == -(-7 // batch_size)
        assert max(backend.sizes) == min(batch_size, 7)  # never more frames in flight
        assert sum(backend.sizes) == 7
        runs.append(result)
    for other in runs[1:]:
        assert other.findings == runs[0].findings


def test_backend_cache_loads_once(fake_cls_package: ModelPackage) -> None:
    cache = BackendCache()
    first = cache.get(fake_cls_package, "fake")
    assert cache.get(fake_cls_package, "fake") is first and len(cache) == 1
    predictor = cache.predictor(fake_cls_package, "fake")
    assert predictor.backend is first
    cache.close()
    assert len(cache) == 0 and not first.loaded


def test_empty_series_and_bad_batch_size(fake_cls_package: ModelPackage) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(fake_cls_package, "fake", batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        Predictor(fake_cls_package, "fake").predict([])


NO_TORCH = textwrap.dedent(
    """
    import sys, importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    from models.package import load_package
    from models.pipeline import Predictor
    from tests.models.helpers import make_image

    pkg = load_package(sys.argv[1])
    img = np.full((80, 60), 100, dtype=np.uint16)
    img[20:30, 40:50] = 3000
    result = Predictor(pkg, "onnxruntime").predict([make_image(img)])
    assert "torch" not in sys.modules
    print(result.findings[0].probability, result.findings[0].peak[1:])
    """
)


def test_serving_runs_with_torch_blocked(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from models.export import export_package
    from models.nets import build_net
    from tests.models.helpers import manifest

    torch.manual_seed(0)
    net = build_net("resnet18", num_classes=1, in_channels=1, base_width=4)
    pkg = export_package(net, tmp_path / "pkg", manifest(arch_kwargs={"base_width": 4}))
    script = tmp_path / "serve.py"
    script.write_text(NO_TORCH)
    out = subprocess.run(
        [sys.executable, str(script), str(pkg.path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    prob = out.stdout.split(" ", 1)[0]
    assert 0.0 <= float(prob) <= 1.0
    # the same prediction through torch-backed serving gives the same probability
    ref = Predictor(pkg, "torch").predict([_reference_image()])
    assert float(prob) == pytest.approx(ref.findings[0].probability, abs=1e-4)


def _reference_image() -> Dataset:
    img = np.full((80, 60), 100, dtype=np.uint16)
    img[20:30, 40:50] = 3000
    return make_image(img)


@pytest.mark.parametrize("shape", [(301, 187), (64, 200)])
def test_segmentation_mask_lands_on_the_original_pixels(
    fake_seg_package: ModelPackage, shape: tuple[int, int]
) -> None:
    truth = np.zeros(shape, dtype=bool)
    r0, c0 = shape[0] // 4, shape[1] // 3
    truth[r0 : r0 + shape[0] // 3, c0 : c0 + shape[1] // 4] = True
    img = np.where(truth, 3000, 100).astype(np.uint16)
    ds = make_image(img, WindowCenter=1550, WindowWidth=2900)
    result = Predictor(fake_seg_package, "fake").predict([ds])
    assert result.mask is not None
    got = result.mask[0] == 1
    iou = (got & truth).sum() / (got | truth).sum()
    assert iou > 0.9
    # disagreement only on the boundary: erode the truth by 3 pixels, all inside the mask
    inner = truth.copy()
    inner[r0 : r0 + 3, :] = inner[r0 + shape[0] // 3 - 3 : r0 + shape[0] // 3, :] = False
    inner[:, c0 : c0 + 3] = inner[:, c0 + shape[1] // 4 - 3 : c0 + shape[1] // 4] = False
    assert got[inner].all()
    assert (got & ~truth).sum() < 0.1 * truth.sum()  # little spill outside
