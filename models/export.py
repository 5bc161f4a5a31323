"""torch → ONNX export, verified against torch with explicit tolerances every time.

The exported graph has a dynamic batch axis (named ``batch``) and named outputs:
``logits`` and ``cam`` for classifiers, ``mask_logits`` for segmentation.  After
writing the file, the same random batch runs through torch and ONNX Runtime and
:class:`ExportMismatchError` is raised when any output differs by more than
``atol + rtol * |torch|`` (``numpy.allclose`` semantics), so a package never ships a
graph that disagrees with its definition.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.package import Manifest, ModelPackage, load_package, parse_manifest, write_manifest

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "ExportMismatchError",
    "ExportReport",
    "export_onnx",
    "export_package",
    "verify_onnx",
]

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4
OPSET = 17


class ExportMismatchError(RuntimeError):
    """ONNX Runtime and torch disagree beyond the stated tolerance."""


@dataclass(frozen=True)
class ExportReport:
    """Per-output maximum absolute difference found by the verification."""

    path: Path
    max_abs_diff: dict[str, float]
    rtol: float
    atol: float


def _output_names(net: nn.Module, example: torch.Tensor) -> list[str]:
    with torch.no_grad():
        out = net(example)
    return ["logits", "cam"] if isinstance(out, tuple) else ["mask_logits"]


def _torch_outputs(net: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = net(x)
    outs = out if isinstance(out, tuple) else (out,)
    return [o.detach().cpu().numpy() for o in outs]


def verify_onnx(
    net: nn.Module,
    onnx_path: str | Path,
    example: torch.Tensor,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> dict[str, float]:
    """Run ``example`` through torch and ONNX Runtime; raise if outside tolerance."""
    import onnxruntime as ort

    net.eval()
    expected = _torch_outputs(net, example)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: example.cpu().numpy()})
    names = [o.name for o in sess.get_outputs()]
    diffs: dict[str, float] = {}
    for name, e, g in zip(names, expected, got, strict=True):
        if e.shape != g.shape:
            raise ExportMismatchError(f"output {name}: shape {g.shape} != torch {e.shape}")
        diffs[name] = float(np.max(np.abs(e - g))) if e.size else 0.0
        if not np.allclose(g, e, rtol=rtol, atol=atol):
            raise ExportMismatchError(
                f"output {name}: ONNX Runtime differs from torch by up to {diffs[name]:.3g} "
                f"(rtol={rtol}, atol={atol})"
            )
    return diffs


def export_onnx(
    net: nn.Module,
    path: str | Path,
    input_shape: tuple[int, int, int],
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    verify_batch: int = 2,
    seed: int = 0,
) -> ExportReport:
    """Export ``net`` for inputs ``(batch, *input_shape)`` and verify it.

    ``input_shape`` is ``(channels, rows, columns)``.  Verification runs with a batch
    of ``verify_batch`` (not the traced batch of 1) so the dynamic axis is exercised.
    """
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (channels, rows, columns), got {input_shape}")
    if verify_batch < 1:
        raise ValueError(f"verify_batch must be >= 1, got {verify_batch}")
    net = net.eval().cpu()
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn((1, *input_shape), generator=gen)
    names = _output_names(net, example)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    dynamic = {n: {0: "batch"} for n in ["input", *names]}
    torch.onnx.export(
        net,
        (example,),
        str(tmp),
        input_names=["input"],
        output_names=names,
        dynamic_axes=dynamic,
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )
    check = torch.randn((verify_batch, *input_shape), generator=gen)
    try:
        diffs = verify_onnx(net, tmp, check, rtol, atol)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return ExportReport(out, diffs, rtol, atol)


def export_package(
    net: nn.Module,
    path: str | Path,
    manifest: Manifest | dict[str, Any],
    model_card: str | None = None,
    save_weights: bool = True,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> ModelPackage:
    """Write a complete package: manifest, verified ``model.onnx``, ``model.pt``, card.

    The input shape comes from the manifest.  An existing ``engines/`` cache is
    emptied, because engines built from the previous ONNX file are stale.
    """
    m = manifest if isinstance(manifest, Manifest) else parse_manifest(manifest)
    root = Path(path)
    write_manifest(root, m)
    engines = root / "engines"
    if engines.exists():
        shutil.rmtree(engines)
    engines.mkdir()
    shape = (m.input.channels, m.input.size[0], m.input.size[1])
    export_onnx(net, root / "model.onnx", shape, rtol, atol)
    if save_weights:
        torch.save(net.state_dict(), root / "model.pt")
    card = model_card or (
        f"# {m.model.name} {m.model.version}\n\nTask: {m.model.task}; arch: {m.model.arch}.\n"
    )
    (root / "model_card.md").write_text(card, encoding="utf-8")
    return load_package(root)
