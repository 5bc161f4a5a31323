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

A backend runs on one GPU, ``device_index`` (a CUDA ordinal, so counted within
``CUDA_VISIBLE_DEVICES`` when that is set).  The node runs one worker per GPU: worker
replica *i* takes :func:`device_for_replica` = *i* modulo the number of visible GPUs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from models.backends.base import Backend, BackendError, Outputs
from models.checks import at_least

if TYPE_CHECKING:
    from models.package import ModelPackage

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "Outputs",
    "create_backend",
    "device_for_replica",
    "resolve_auto",
    "visible_gpus",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch", "fake")


_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def visible_gpus(nvidia_gpus: Path = _NVIDIA_GPUS) -> int:
    """How many GPUs this process may use, without importing a CUDA library.

    ``CUDA_VISIBLE_DEVICES`` when set (its entries up to the first invalid one, as
    CUDA reads it: ``""`` or ``"-1"`` hide every GPU); else the GPUs the NVIDIA driver
    lists under ``/proc/driver/nvidia/gpus``; else none.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        n = 0
        for entry in env.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break
            n += 1
        return n
    try:
        return sum(1 for p in nvidia_gpus.iterdir() if p.is_dir())
    except OSError:
        return 0


def device_for_replica(replica: int, gpus: int | None = None) -> int | None:
    """The GPU of worker replica ``replica``: ``replica % gpus``; ``None`` without GPUs."""
    at_least(0, replica=replica)
    n = visible_gpus() if gpus is None else gpus
    return None if n <= 0 else replica % n


def _make(name: str, intra_op_threads: int, device_index: int | None) -> Backend:
    if name == "onnxruntime":
        from models.backends.ort import OnnxRuntimeBackend

        return OnnxRuntimeBackend(intra_op_threads=intra_op_threads, device_index=device_index)
    if name == "tensorrt":
        from models.backends.trt import TensorRTBackend

        return TensorRTBackend(device_index=device_index or 0)
    if name == "torch":
        from models.backends.torch_backend import TorchBackend

        return TorchBackend(threads=intra_op_threads, device_index=device_index)
    if name == "fake":
        from models.backends.fake import FakeBackend

        return FakeBackend(device_index=device_index)
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


def create_backend(
    name: str,
    package: ModelPackage,
    intra_op_threads: int = 0,
    device_index: int | None = None,
) -> Backend:
    """Create and load a backend for ``package`` on GPU ``device_index`` when it has one.

    With ``auto``, each candidate from :func:`resolve_auto` is tried in turn; a
    candidate that fails to load is logged and the next one is tried.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    candidates = resolve_auto(package) if name == "auto" else [name]
    last: Exception | None = None
    for cand in candidates:
        backend = _make(cand, intra_op_threads, device_index)
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
