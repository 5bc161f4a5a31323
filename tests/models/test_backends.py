"""Backends: lazy imports, selection, agreement with torch, and GPU paths (skipped here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.backends import BackendError, create_backend, resolve_auto
from models.package import ModelPackage
from tests.models.helpers import manifest

ROOT = Path(__file__).resolve().parents[2]


def test_importing_backends_loads_no_ml_library() -> None:
    code = (
        "import sys, models.backends, models.pipeline, models.package, models.preprocess\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_unknown_backend_is_a_one_line_error(fake_cls_package: ModelPackage) -> None:
    with pytest.raises(BackendError, match="unknown backend 'gpu-magic'"):
        create_backend("gpu-magic", fake_cls_package)


def test_fake_backend_validates_batch_shape(fake_cls_package: ModelPackage) -> None:
    backend = create_backend("fake", fake_cls_package)
    with pytest.raises(BackendError, match="batch shape"):
        backend.infer(np.zeros((1, 1, 32, 32), dtype=np.float32))
    out = backend.infer(np.zeros((2, 1, 64, 64), dtype=np.float32))
    assert out["logits"].shape == (2, 1) and out["cam"].shape == (2, 1, 16, 16)
    backend.close()
    with pytest.raises(BackendError, match="load"):
        backend.infer(np.zeros((1, 1, 64, 64), dtype=np.float32))


@pytest.fixture(scope="module")
def real_package(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    torch = pytest.importorskip("torch")
    from models.export import export_package
    from models.nets import build_net

    torch.manual_seed(3)
    data = manifest(arch="densenet121", arch_kwargs={"growth_rate": 4, "num_init_features": 8})
    data["output"]["labels"].append(
        {"name": "mass", "code": {"value": "4147007", "scheme": "SCT", "meaning": "Mass"}}
    )
    net = build_net("densenet121", num_classes=2, in_channels=1, growth_rate=4, num_init_features=8)
    return export_package(net, tmp_path_factory.mktemp("pkg") / "dn", data)


def test_onnxruntime_and_torch_backends_agree(real_package: ModelPackage) -> None:
    x = np.random.default_rng(0).standard_normal((3, 1, 64, 64)).astype(np.float32)
    ort_b = create_backend("onnxruntime", real_package, intra_op_threads=1)
    torch_b = create_backend("torch", real_package, intra_op_threads=1)
    assert (ort_b.device, torch_b.device) == ("cpu", "cpu")
    a, b = ort_b.infer(x), torch_b.infer(x)
    assert set(a) == set(b) == {"logits", "cam"}
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-4, err_msg=k)


def test_auto_falls_back_to_onnxruntime_cpu_without_gpu(real_package: ModelPackage) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_auto(real_package)[-1] == "onnxruntime"
    backend = create_backend("auto", real_package)
    assert (backend.name, backend.device) == ("onnxruntime", "cpu")


def test_torch_backend_needs_weights(fake_cls_package: ModelPackage) -> None:
    pytest.importorskip("torch")
    with pytest.raises(BackendError, match=r"model\.pt is missing"):
        create_backend("torch", fake_cls_package)


def test_broken_onnx_is_a_backend_error(fake_cls_package: ModelPackage) -> None:
    with pytest.raises(BackendError, match="cannot load") as info:
        create_backend("onnxruntime", fake_cls_package)  # its model.onnx is junk bytes
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
def test_torch_cuda_agrees_with_cpu(real_package: ModelPackage) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    from models.backends.torch_backend import TorchBackend

    x = np.random.default_rng(1).standard_normal((4, 1, 64, 64)).astype(np.float32)
    cpu = create_backend("onnxruntime", real_package).infer(x)
    for half, tol in ((False, 1e-3), (True, 5e-2)):
        gpu = TorchBackend(device="cuda", half=half)
        gpu.load(real_package)
        out = gpu.infer(x)
        for k in cpu:
            np.testing.assert_allclose(out[k], cpu[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.gpu
def test_tensorrt_engine_agrees_and_is_cached(real_package: ModelPackage) -> None:
    pytest.importorskip("tensorrt")
    from models.backends.trt import TensorRTBackend, tensorrt_available

    if not tensorrt_available():
        pytest.skip("no CUDA device for TensorRT")
    x = np.random.default_rng(2).standard_normal((5, 1, 64, 64)).astype(np.float32)
    cpu = create_backend("onnxruntime", real_package).infer(x)
    trt_b = TensorRTBackend(fp16=False, max_batch=4, opt_batch=2)
    trt_b.load(real_package)
    assert trt_b.engine_path is not None and trt_b.engine_path.is_file()
    out = trt_b.infer(x)  # 5 > max_batch: runs in two chunks
    for k in cpu:
        np.testing.assert_allclose(out[k], cpu[k], rtol=1e-2, atol=1e-3, err_msg=k)
    mtime = trt_b.engine_path.stat().st_mtime_ns
    trt_b.close()
    again = TensorRTBackend(fp16=False, max_batch=4, opt_batch=2)
    again.load(real_package)
    assert again.engine_path == trt_b.engine_path
    assert again.engine_path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    again.close()
