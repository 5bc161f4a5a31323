"""DenseNet-121 (Huang et al., CVPR 2017) in plain torch, with a CAM output.

DenseNet-121 is the CheXNet backbone for chest radiographs.  ``growth_rate`` and
``num_init_features`` set the width (32 and 64 as published); ``block_config`` may be
shortened for tiny test nets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checks import at_least
from models.nets._cam import CamHead

__all__ = ["DenseNet", "DenseNet121"]


class _DenseLayer(nn.Module):
    def __init__(self, in_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.conv1 = nn.Conv2d(in_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return torch.cat([x, out], 1)


class _Transition(nn.Sequential):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_features, out_features, 1, bias=False),
            nn.AvgPool2d(2, 2),
        )


class DenseNet(nn.Module):
    """DenseNet-BC classifier returning ``(logits, cam)``; cam is at 1/32 of the input."""

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 1,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        at_least(
            1,
            num_classes=num_classes,
            in_channels=in_channels,
            growth_rate=growth_rate,
            num_init_features=num_init_features,
            bn_size=bn_size,
        )
        if not block_config or any(n < 1 for n in block_config):
            raise ValueError(f"block_config must be positive layer counts, got {block_config}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False),
            nn.BatchNorm2d(num_init_features),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        n = num_init_features
        for i, n_layers in enumerate(block_config):
            for _ in range(n_layers):
                layers.append(_DenseLayer(n, growth_rate, bn_size, drop_rate))
                n += growth_rate
            if i != len(block_config) - 1:
                layers.append(_Transition(n, n // 2))
                n //= 2
        layers += [nn.BatchNorm2d(n), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = CamHead(n, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, cam = self.head(self.features(x))
        return logits, cam


def DenseNet121(
    num_classes: int = 1,
    in_channels: int = 1,
    growth_rate: int = 32,
    num_init_features: int = 64,
    block_config: Sequence[int] = (6, 12, 24, 16),
    drop_rate: float = 0.0,
) -> DenseNet:
    """DenseNet-121: blocks (6, 12, 24, 16), growth rate 32, 64 initial features."""
    return DenseNet(
        num_classes, in_channels, growth_rate, block_config, num_init_features, 4, drop_rate
    )
