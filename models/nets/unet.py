"""A 2D U-Net (Ronneberger et al., MICCAI 2015) for slice-wise segmentation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.checks import at_least

__all__ = ["UNet2D"]


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    """U-Net returning per-pixel logits ``(N, num_classes, H, W)``.

    Class 0 is background.  ``depth`` pooling steps, so H and W must be divisible by
    ``2**depth``; channels double at every step from ``base_channels``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 32, depth: int = 4
    ) -> None:
        super().__init__()
        at_least(1, in_channels=in_channels)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + one), got {num_classes}")
        at_least(1, base_channels=base_channels)
        if not 1 <= depth <= 6:
            raise ValueError(f"depth must be in 1..6, got {depth}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        chs = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(in_channels, chs[0])])
        self.down.extend(_double_conv(chs[i], chs[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(chs[i + 1], chs[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.up_conv = nn.ModuleList(
            _double_conv(2 * chs[i], chs[i]) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(chs[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            step = 2**self.depth
            if x.shape[-1] % step or x.shape[-2] % step:
                raise ValueError(
                    f"input size {tuple(x.shape[-2:])} must be divisible by 2**depth = {step}"
                )
        skips: list[Tensor] = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, conv in zip(self.up, self.up_conv, strict=True):
            x = conv(torch.cat([up(x), skips.pop()], 1))
        logits: Tensor = self.out(x)
        return logits
