"""Class activation map head shared by the classifiers.

A classifier that ends in global average pooling + linear computes, for class *k*,
``logit_k = b_k + mean_xy(sum_c W_kc * f_c(x, y))``.  The inner sum, evaluated per
position, is the class activation map (Zhou et al., CVPR 2016).  Computing it as a
1x1 convolution with the linear weights gives it from the same forward pass, so it
exports to ONNX as a second output and runs on TensorRT like any other layer: no
backward pass and no torch at serving time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checks import at_least

__all__ = ["CamHead"]


class CamHead(nn.Module):
    """Global average pooling + linear, returning ``(logits, cam)``.

    ``cam`` has shape ``(N, num_classes, h, w)`` and satisfies
    ``logits == cam.mean((2, 3)) + fc.bias`` exactly (up to rounding).
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        at_least(1, in_features=in_features, num_classes=num_classes)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        weight = self.fc.weight[:, :, None, None]
        cam = F.conv2d(features, weight)
        logits = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        logits = self.fc(logits)
        return logits, cam
