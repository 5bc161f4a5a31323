"""Nets: shapes, CAM consistency, argument checks, and ONNX Runtime == torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from models.export import ExportMismatchError, export_onnx, verify_onnx  # noqa: E402
from models.nets import DenseNet121, ResNet18, ResNet50, UNet2D, build_net  # noqa: E402

# tiny widths keep every test well under a second on one core
TINY: dict[str, dict[str, Any]] = {
    "resnet18": {"base_width": 8},
    "resnet50": {"base_width": 4},
    "densenet121": {"growth_rate": 4, "num_init_features": 8},
}
RTOL, ATOL = 1e-3, 1e-4


@pytest.mark.parametrize("arch", sorted(TINY))
def test_classifier_returns_logits_and_cam_consistent_with_them(arch: str) -> None:
    torch.manual_seed(0)
    net = build_net(arch, num_classes=3, in_channels=2, **TINY[arch]).eval()
    with torch.no_grad():
        logits, cam = net(torch.randn(2, 2, 96, 64))
    assert logits.shape == (2, 3)
    assert cam.shape == (2, 3, 3, 2)  # 1/32 of the input
    # GAP + linear == spatial mean of the CAM + bias: same forward pass
    bias = net.get_parameter("head.fc.bias")
    rebuilt = cam.mean((2, 3)) + bias
    torch.testing.assert_close(rebuilt, logits, rtol=1e-5, atol=1e-5)


def test_unet_shape_and_divisibility_check() -> None:
    net = UNet2D(in_channels=1, num_classes=3, base_channels=4, depth=3).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 40, 24)).shape == (1, 3, 40, 24)
        with pytest.raises(ValueError, match="divisible"):
            net(torch.randn(1, 1, 36, 24))


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (ResNet18, {"num_classes": 0}, "num_classes"),
        (ResNet50, {"base_width": 0}, "base_width"),
        (DenseNet121, {"growth_rate": 0}, "growth_rate"),
        (DenseNet121, {"in_channels": 0}, "in_channels"),
        (UNet2D, {"num_classes": 1}, "num_classes"),
        (UNet2D, {"depth": 9}, "depth"),
    ],
)
def test_bad_arguments_name_the_argument(factory: Any, kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_build_net_unknown_arch() -> None:
    with pytest.raises(ValueError, match="unknown arch 'vgg16'"):
        build_net("vgg16")
    with pytest.raises(ValueError, match="bad arguments"):
        build_net("resnet18", nonsense=1)
    assert isinstance(build_net("DenseNet-121", **TINY["densenet121"]), torch.nn.Module)


NETS = [
    ("resnet18", (1, 64, 96), TINY["resnet18"] | {"num_classes": 2}),
    ("resnet50", (1, 64, 64), TINY["resnet50"] | {"num_classes": 2}),
    ("densenet121", (3, 64, 64), TINY["densenet121"] | {"num_classes": 2, "in_channels": 3}),
    ("unet2d", (1, 48, 32), {"base_channels": 4, "depth": 3, "num_classes": 3}),
]


@pytest.mark.parametrize(("arch", "shape", "kwargs"), NETS, ids=[n[0] for n in NETS])
def test_onnxruntime_agrees_with_torch(
    arch: str, shape: tuple[int, int, int], kwargs: dict[str, Any], tmp_path: Path
) -> None:
    torch.manual_seed(1)
    net = build_net(arch, **kwargs).eval()
    # non-trivial batch-norm statistics, so folding them is actually exercised
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    report = export_onnx(net, tmp_path / "m.onnx", shape, rtol=RTOL, atol=ATOL)
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == (["mask_logits"] if arch == "unet2d" else ["logits", "cam"])
    x = torch.randn(5, *shape)  # batch 5: dynamic axis, not the traced batch of 1
    got = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        out = net(x)
    expected = out if isinstance(out, tuple) else (out,)
    for name, g, e in zip(names, got, expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), rtol=RTOL, atol=ATOL, err_msg=name)
    if arch == "unet2d":  # the masks themselves agree
        agree = (got[0].argmax(1) == expected[0].numpy().argmax(1)).mean()
        assert agree > 0.999


def test_verify_raises_when_onnx_disagrees(tmp_path: Path) -> None:
    net = build_net("resnet18", **TINY["resnet18"]).eval()
    export_onnx(net, tmp_path / "m.onnx", (1, 32, 32))
    with torch.no_grad():
        net.get_parameter("head.fc.bias").add_(1.0)  # the torch net changes after export
    with pytest.raises(ExportMismatchError, match="logits"):
        verify_onnx(net, tmp_path / "m.onnx", torch.randn(1, 1, 32, 32))
