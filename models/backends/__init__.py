"""Inference backends behind one small interface, imported lazily.

``import models.backends`` imports neither torch, onnxruntime nor tensorrt; each
implementation imports its library in ``load()``.

=============  ==================================================================
name           what
=============  ==================================================================
onnxruntime    ONNX Runtime, CPU (CUDA provider when installed and a GPU exists)
tensorrt       TensorRT 10 engine built from model.onnx, cached per GPU/TRT version
torch          the reference: net rebuilt from the manifest arch + model.pt
fake           deterministic outputs from input statistics, for pipeline tests
auto           tensorrt > onnxruntime CUDA > torch CUDA > onnxruntime CPU
=============  ==================================================================
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

from models.backends.base import Backend, BackendError, Outputs

if TYPE_CHECKING:
    from models.package import ModelPackage

__all__ = ["BACKENDS", "Backend", "BackendError", "Outputs", "create_backend", "resolve_auto"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch", "fake")


def _make(name: str, intra_op_threads: int) -> Backend:
    if name == "onnxruntime":
        from models.backends.ort import OnnxRuntimeBackend

        return OnnxRuntimeBackend(intra_op_threads=intra_op_threads)
    if name == "tensorrt":
        from models.backends.trt import TensorRTBackend

        return TensorRTBackend()
    if name == "torch":
        from models.backends.torch_backend import TorchBackend

        return TorchBackend(threads=intra_op_threads)
    if name == "fake":
        from models.backends.fake import FakeBackend

        return FakeBackend()
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def resolve_auto(package: ModelPackage) -> list[str]:
    """The backends ``auto`` will try, best first, on this machine for this package."""
    order: list[str] = []
    if importlib.util.find_spec("tensorrt") is not None:
        from models.backends.trt import tensorrt_available

        if tensorrt_available():
            order.append("tensorrt")
    from models.backends.ort import cuda_available as ort_cuda

    if ort_cuda():
        order.append("onnxruntime")
    if importlib.util.find_spec("torch") is not None and package.torch_weights_path.is_file():
        from models.backends.torch_backend import cuda_available as torch_cuda

        if torch_cuda():
            order.append("torch")
    if "onnxruntime" not in order:
        order.append("onnxruntime")
    return order


def create_backend(name: str, package: ModelPackage, intra_op_threads: int = 0) -> Backend:
    """Create and load a backend for ``package``.

    With ``auto``, each candidate from :func:`resolve_auto` is tried in turn; a
    candidate that fails to load is logged and the next one is tried.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    candidates = resolve_auto(package) if name == "auto" else [name]
    last: Exception | None = None
    for cand in candidates:
        backend = _make(cand, intra_op_threads)
        try:
            backend.load(package)
        except BackendError as exc:
            if name != "auto":
                raise
            log.warning("backend %s unavailable: %s", cand, exc)
            last = exc
            continue
        return backend
    raise BackendError(f"no backend could load {package.name}: {last}")
