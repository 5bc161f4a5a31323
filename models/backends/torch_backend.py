"""torch backend: the reference implementation, and the GPU path without TensorRT.

Rebuilds the net from the manifest's ``arch`` / ``arch_kwargs`` and loads the
package's ``model.pt`` state dict.  ``half=True`` runs FP16 on CUDA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from models.backends.base import Backend, BackendError, Outputs
from models.checks import at_least

if TYPE_CHECKING:
    from models.package import ModelPackage

__all__ = ["TorchBackend", "cuda_available"]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class TorchBackend(Backend):
    """``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``"auto"``.

    ``device_index`` picks the GPU that ``"auto"`` and ``"cuda"`` use.
    """

    name = "torch"

    def __init__(
        self,
        device: str = "auto",
        half: bool = False,
        threads: int = 0,
        device_index: int | None = None,
    ) -> None:
        super().__init__()
        at_least(0, device_index=device_index)
        self.device_index = device_index
        if not (device in ("auto", "cpu") or device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
        at_least(0, threads=threads)
        self._want = device
        self.device = "cpu" if device == "auto" else device
        self.half = half
        self.threads = threads
        self._net: Any = None

    def load(self, package: ModelPackage) -> None:
        try:
            import torch

            from models.nets import build_net
        except ImportError as exc:
            raise BackendError("torch backend: torch is not installed") from exc
        m = package.manifest
        if not package.torch_weights_path.is_file():
            raise BackendError(f"torch backend: {package.torch_weights_path} is missing")
        device = self._want
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self.device_index is not None:
            device = f"cuda:{self.device_index}"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("torch backend: CUDA is not available")
        if self.threads:
            torch.set_num_threads(self.threads)
        kwargs = dict(m.model.arch_kwargs)
        kwargs.setdefault("num_classes", m.num_classes)
        kwargs.setdefault("in_channels", m.input.channels)
        try:
            net = build_net(m.model.arch, **kwargs)
            state = torch.load(package.torch_weights_path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except (ValueError, RuntimeError) as exc:
            first = str(exc).splitlines()[0]
            raise BackendError(f"torch backend: cannot build {m.model.arch}: {first}") from exc
        net = net.eval().to(device)
        if self.half and device.startswith("cuda"):
            net = net.half()
        self._net = net
        self.device = device
        self._names = m.output_names
        self._package = package

    def _run(self, batch: npt.NDArray[np.float32]) -> Outputs:
        import torch

        x = torch.from_numpy(batch).to(self.device)
        if self.half and self.device.startswith("cuda"):
            x = x.half()
        with torch.inference_mode():
            out = self._net(x)
        outs = out if isinstance(out, tuple) else (out,)
        return {
            n: o.float().cpu().numpy().astype(np.float32, copy=False)
            for n, o in zip(self._names, outs, strict=True)
        }

    def close(self) -> None:
        self._net = None
        super().close()
