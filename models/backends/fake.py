"""A deterministic fake backend for pipeline tests: no model file, no ML library.

Classification: ``logit = gain * (max of the smoothed input - 0.5)`` for every
label, and a CAM at 1/``stride`` resolution that is a Gaussian blob centred on the
brightest spot of the input, so a test that draws a bright nodule knows where the
heatmap peak must land.  Segmentation: class 1 (and every other label) is "input
above 0.5" with logits ``gain * (x - 0.5)``; background is 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from models.backends.base import Backend, Outputs
from models.checks import at_least

if TYPE_CHECKING:
    from models.package import ModelPackage

__all__ = ["FakeBackend"]


class FakeBackend(Backend):
    name = "fake"
    device = "cpu"

    def __init__(
        self,
        gain: float = 10.0,
        stride: int = 4,
        sigma: float = 1.5,
        device_index: int | None = None,
    ) -> None:
        super().__init__()
        # Computes on the CPU; records the GPU it was given, as a real backend uses it.
        self.device_index = device_index
        self.device = "cpu" if device_index is None else f"cuda:{device_index}"
        at_least(1, stride=stride)
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.gain = gain
        self.stride = stride
        self.sigma = sigma
        self.calls = 0

    def load(self, package: ModelPackage) -> None:
        self._package = package

    def _run(self, batch: npt.NDArray[np.float32]) -> Outputs:
        self.calls += 1
        m = self.package.manifest
        x = batch.mean(axis=1)  # (N, H, W)
        if m.model.task == "segmentation":
            fg = self.gain * (x - 0.5)
            classes = [np.zeros_like(fg)] + [fg] * (m.num_classes - 1)
            return {"mask_logits": np.stack(classes, axis=1).astype(np.float32)}
        n, h, w = x.shape
        s = self.stride
        hh, ww = max(h // s, 1), max(w // s, 1)
        pooled = x[:, : hh * s, : ww * s].reshape(n, hh, s, ww, s).mean(axis=(2, 4))
        yy, xx = np.mgrid[0:hh, 0:ww]
        cams = np.empty((n, m.num_classes, hh, ww), dtype=np.float32)
        logits = np.empty((n, m.num_classes), dtype=np.float32)
        for i in range(n):
            r, c = np.unravel_index(int(np.argmax(pooled[i])), pooled[i].shape)
            blob = np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * self.sigma**2))
            cams[i] = blob[np.newaxis]
            logits[i] = self.gain * (float(pooled[i].max()) - 0.5)
        return {"logits": logits, "cam": cams}
