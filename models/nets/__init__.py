"""Network definitions in plain torch (no torchvision).

Classifiers (:func:`DenseNet121`, :func:`ResNet18`, :func:`ResNet50`) return
``(logits, cam)``; :class:`UNet2D` returns per-pixel logits.  :func:`build_net`
rebuilds a net from the ``arch`` string stored in a model package's manifest.
Importing this package imports torch; the serving path never does.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from models.nets.densenet import DenseNet, DenseNet121
from models.nets.resnet import ResNet, ResNet18, ResNet50
from models.nets.unet import UNet2D

__all__ = [
    "ARCHITECTURES",
    "DenseNet",
    "DenseNet121",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "UNet2D",
    "build_net",
]

ARCHITECTURES: dict[str, Any] = {
    "densenet121": DenseNet121,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "unet2d": UNet2D,
}


def build_net(arch: str, **kwargs: Any) -> nn.Module:
    """Build a net by name (case-insensitive): densenet121, resnet18, resnet50, unet2d.

    ``kwargs`` go to the constructor (``num_classes``, ``in_channels``, widths...).
    """
    key = arch.lower().replace("-", "").replace("_", "")
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    try:
        net: nn.Module = ARCHITECTURES[key](**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for arch {arch!r}: {exc}") from exc
    return net
