"""The backend interface: ``load(package)``, ``infer(batch) -> outputs``, ``close()``.

Every backend takes a float32 batch ``(N, C, H, W)`` in the manifest's input layout
and returns numpy arrays keyed by the ONNX output names (``logits``/``cam`` or
``mask_logits``).  Nothing here imports torch, onnxruntime or tensorrt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from models.package import ModelPackage

__all__ = ["Backend", "BackendError", "Outputs"]

Outputs = dict[str, npt.NDArray[np.float32]]


class BackendError(RuntimeError):
    """A backend cannot be loaded or cannot run the model (one-line message)."""


class Backend(ABC):
    """One loaded model on one device.  Not thread-safe: one per worker process."""

    name: str = "abstract"
    device: str = "cpu"

    def __init__(self) -> None:
        self._package: ModelPackage | None = None

    @property
    def package(self) -> ModelPackage:
        if self._package is None:
            raise BackendError(f"{self.name} backend: load(package) has not been called")
        return self._package

    @property
    def loaded(self) -> bool:
        return self._package is not None

    @abstractmethod
    def load(self, package: ModelPackage) -> None:
        """Prepare the model for inference (may be slow: sessions, engines)."""

    @abstractmethod
    def _run(self, batch: npt.NDArray[np.float32]) -> Outputs:
        """Run one validated batch."""

    def infer(self, batch: npt.NDArray[np.floating]) -> Outputs:
        """Run a batch ``(N, C, H, W)``; validates shape against the manifest."""
        spec = self.package.manifest.input
        expected = (spec.channels, spec.size[0], spec.size[1])
        arr = np.ascontiguousarray(batch, dtype=np.float32)
        if arr.ndim != 4 or tuple(arr.shape[1:]) != expected or arr.shape[0] < 1:
            raise BackendError(f"{self.name} backend: batch shape {arr.shape} != (N, *{expected})")
        return self._run(arr)

    def close(self) -> None:
        """Release sessions and device memory; the backend can be loaded again."""
        self._package = None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        pkg = f"{self._package.name} {self._package.version}" if self._package else "unloaded"
        return f"<{type(self).__name__} {self.name} on {self.device}: {pkg}>"
