"""ONNX Runtime backend: the default on a machine without a GPU.

Uses the CUDA execution provider when ``onnxruntime-gpu`` is installed and a GPU is
present, else the CPU provider with all graph optimisations enabled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from models.backends.base import Backend, BackendError, Outputs
from models.checks import at_least

if TYPE_CHECKING:
    from models.package import ModelPackage

__all__ = ["OnnxRuntimeBackend", "cuda_available"]


def cuda_available() -> bool:
    """True when ONNX Runtime offers the CUDA execution provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRuntimeBackend(Backend):
    """``device`` is ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).

    ``spin=False`` (default) stops idle intra-op threads from busy-waiting: on a node
    whose receiver shares the cores, spinning workers would take CPU from reception
    for a few percent of throughput.
    """

    name = "onnxruntime"

    def __init__(
        self,
        device: str = "auto",
        intra_op_threads: int = 0,
        spin: bool = False,
        device_index: int | None = None,
    ) -> None:
        super().__init__()
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        at_least(0, device_index=device_index)
        self.device_index = device_index
        at_least(0, intra_op_threads=intra_op_threads)
        self._want = device
        self.device = "cpu" if device == "auto" else device
        self.intra_op_threads = intra_op_threads
        self.spin = spin
        self._session: Any = None
        self._input = "input"

    def load(self, package: ModelPackage) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("onnxruntime backend: onnxruntime is not installed") from exc
        if not package.onnx_path.is_file():
            raise BackendError(f"onnxruntime backend: {package.onnx_path} is missing")
        use_cuda = self._want == "cuda" or (self._want == "auto" and cuda_available())
        if self._want == "cuda" and not cuda_available():
            raise BackendError("onnxruntime backend: CUDAExecutionProvider is not available")
        providers: list[Any] = ["CPUExecutionProvider"]
        if use_cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device_index or 0}))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        try:
            self._session = ort.InferenceSession(
                str(package.onnx_path), sess_options=opts, providers=providers
            )
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BackendError(
                f"onnxruntime backend: cannot load {package.onnx_path}: {first}"
            ) from exc
        on_gpu = "CUDAExecutionProvider" in self._session.get_providers()
        self.device = f"cuda:{self.device_index or 0}" if on_gpu else "cpu"
        self._input = self._session.get_inputs()[0].name
        self._names = [o.name for o in self._session.get_outputs()]
        self._package = package

    def _run(self, batch: npt.NDArray[np.float32]) -> Outputs:
        outs = self._session.run(None, {self._input: batch})
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(self._names, outs, strict=True)}

    def close(self) -> None:
        self._session = None
        super().close()
