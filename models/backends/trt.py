"""TensorRT 10 backend: engine built from the package's ONNX file and cached.

- The engine is built with an optimisation profile over the batch axis
  (min 1, opt ``opt_batch``, max ``max_batch``) and FP16 where the GPU has fast FP16.
- The serialised engine is cached under ``package/engines/`` keyed by GPU name,
  compute capability, TensorRT version, precision and batch range, because an
  engine is only valid for the exact GPU model and TensorRT build that made it.
- Inference uses ``set_input_shape`` / ``set_tensor_address`` /
  ``execute_async_v3`` (the TensorRT 10 name-based I/O API) on a private CUDA
  stream; device buffers are allocated once for ``max_batch``.

Device memory and copies use cuda-python (``cuda.bindings.runtime``, or the older
``cuda.cudart``) so serving needs neither torch nor pycuda.  All imports are lazy.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from models.backends.base import Backend, BackendError, Outputs
from models.checks import at_least

if TYPE_CHECKING:
    from models.package import ModelPackage

__all__ = ["TensorRTBackend", "engine_cache_path", "tensorrt_available"]

log = logging.getLogger(__name__)


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result: Any) -> Any:
    """cuda-python returns ``(err, *values)``; raise on a non-zero error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    code: Any = getattr(err, "value", err)  # cudaError_t enum; 0 is cudaSuccess
    if int(code) != 0:
        raise BackendError(f"tensorrt backend: CUDA call failed with {err}")
    return rest[0] if len(rest) == 1 else rest


def tensorrt_available() -> bool:
    """True when tensorrt and cuda-python import and a CUDA device is present."""
    try:
        import tensorrt  # noqa: F401

        cudart = _cudart()
        return int(_check(cudart.cudaGetDeviceCount())) > 0
    except Exception:
        return False


def _gpu_identity(device_index: int) -> tuple[str, str]:
    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(device_index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    name = name.rstrip("\x00").strip()
    return name, f"{props.major}.{props.minor}"


def engine_cache_path(
    package: ModelPackage,
    gpu_name: str,
    compute_capability: str,
    trt_version: str,
    fp16: bool,
    max_batch: int,
) -> Path:
    """``engines/<gpu>_sm<cc>_trt<ver>_<fp16|fp32>_b<max>_<onnx hash>.engine``.

    The ONNX file's hash is part of the key, so re-exporting invalidates engines.
    """
    digest = hashlib.sha256(package.onnx_path.read_bytes()).hexdigest()[:12]
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-")
    cc = compute_capability.replace(".", "")
    prec = "fp16" if fp16 else "fp32"
    return (
        package.engines_dir / f"{gpu}_sm{cc}_trt{trt_version}_{prec}_b{max_batch}_{digest}.engine"
    )


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(
        self,
        device_index: int = 0,
        fp16: bool = True,
        max_batch: int = 16,
        opt_batch: int = 8,
        workspace_bytes: int = 2 << 30,
    ) -> None:
        super().__init__()
        at_least(0, device_index=device_index)
        at_least(1, max_batch=max_batch)
        if not 1 <= opt_batch <= max_batch:
            raise ValueError(f"opt_batch must be in 1..max_batch, got {opt_batch}")
        self.device_index = device_index
        self.device = f"cuda:{device_index}"
        self.fp16 = fp16
        self.max_batch = max_batch
        self.opt_batch = opt_batch
        self.workspace_bytes = workspace_bytes
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._buffers: dict[str, int] = {}
        self.engine_path: Path | None = None

    # -- engine -------------------------------------------------------------------
    def _build(self, trt: Any, logger: Any, package: ModelPackage) -> bytes:
        spec = package.manifest.input
        chw = (spec.channels, spec.size[0], spec.size[1])
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(package.onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"tensorrt backend: cannot parse ONNX: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        # platform_has_fast_fp16 is deprecated in late TRT 10 releases: assume yes then
        if self.fp16 and getattr(builder, "platform_has_fast_fp16", True):
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        name = network.get_input(0).name
        profile.set_shape(
            name, (1, *chw), (min(self.opt_batch, self.max_batch), *chw), (self.max_batch, *chw)
        )
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError("tensorrt backend: engine build failed (see TensorRT log)")
        return bytes(serialized)

    def load(self, package: ModelPackage) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendError("tensorrt backend: tensorrt is not installed") from exc
        try:
            cudart = _cudart()
        except ImportError as exc:
            raise BackendError("tensorrt backend: cuda-python is not installed") from exc
        _check(cudart.cudaSetDevice(self.device_index))
        gpu_name, cc = _gpu_identity(self.device_index)
        fp16 = self.fp16
        path = engine_cache_path(package, gpu_name, cc, trt.__version__, fp16, self.max_batch)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = None
        if path.is_file():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                log.warning("stale TensorRT engine %s; rebuilding", path.name)
        if engine is None:
            data = self._build(trt, logger, package)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BackendError("tensorrt backend: cannot deserialise the engine")
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = _check(cudart.cudaStreamCreate())
        spec = package.manifest.input
        chw = (spec.channels, spec.size[0], spec.size[1])
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._dtypes: dict[str, Any] = {}
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            self._dtypes[tname] = np.dtype(trt.nptype(engine.get_tensor_dtype(tname)))
            if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
                self._inputs.append(tname)
            else:
                self._outputs.append(tname)
        # allocate for the largest batch: set the max shape and read output shapes
        self._context.set_input_shape(self._inputs[0], (self.max_batch, *chw))
        for tname in self._inputs + self._outputs:
            shape = tuple(self._context.get_tensor_shape(tname))
            nbytes = int(np.prod(shape)) * self._dtypes[tname].itemsize
            self._buffers[tname] = int(_check(cudart.cudaMalloc(nbytes)))
            self._context.set_tensor_address(tname, self._buffers[tname])
        self.engine_path = path
        self.device = f"cuda:{self.device_index}"
        self._package = package

    # -- inference ----------------------------------------------------------------
    def _run(self, batch: npt.NDArray[np.float32]) -> Outputs:
        cudart = _cudart()
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        results: dict[str, list[npt.NDArray[np.float32]]] = {n: [] for n in self._outputs}
        for start in range(0, batch.shape[0], self.max_batch):
            chunk = batch[start : start + self.max_batch]
            inp = self._inputs[0]
            host_in = np.ascontiguousarray(chunk, dtype=self._dtypes[inp])
            self._context.set_input_shape(inp, host_in.shape)
            _check(
                cudart.cudaMemcpyAsync(
                    self._buffers[inp], host_in.ctypes.data, host_in.nbytes, h2d, self._stream
                )
            )
            if not self._context.execute_async_v3(self._stream):
                raise BackendError("tensorrt backend: execute_async_v3 failed")
            hosts = {}
            for out in self._outputs:
                shape = tuple(self._context.get_tensor_shape(out))
                host = np.empty(shape, dtype=self._dtypes[out])
                _check(
                    cudart.cudaMemcpyAsync(
                        host.ctypes.data, self._buffers[out], host.nbytes, d2h, self._stream
                    )
                )
                hosts[out] = host
            _check(cudart.cudaStreamSynchronize(self._stream))
            for out, host in hosts.items():
                results[out].append(host.astype(np.float32, copy=False))
        return {n: np.concatenate(v, axis=0) for n, v in results.items()}

    def close(self) -> None:
        if self._buffers or self._stream is not None:
            cudart = _cudart()
            for ptr in self._buffers.values():
                cudart.cudaFree(ptr)
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
        self._buffers = {}
        self._stream = None
        self._context = None
        self._engine = None
        super().close()
