"""Checks other tests reuse: dicom3tools' dciodvfy, dcmtk's dsr2html, and the viewer
libraries OHIF uses (dcmjs and the Cornerstone adapters, run headless in Node)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.conftest import require_tool

__all__ = ["assert_dciodvfy_clean", "cornerstone_load", "dciodvfy_messages", "dsr2html"]

JS_DIR = Path(__file__).parent / "js"


def dciodvfy_messages(path: Path | str) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` that dciodvfy reports for the file at ``path``."""
    exe = require_tool("dciodvfy")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


def assert_dciodvfy_clean(path: Path | str) -> list[str]:
    """Fail unless dciodvfy finds zero errors; returns the warnings for inspection."""
    errors, warnings = dciodvfy_messages(path)
    assert not errors, f"dciodvfy errors in {path}:\n" + "\n".join(errors)
    return warnings


def dsr2html(path: Path | str) -> str:
    """Render an SR with dcmtk's dsr2html; fails the test on a non-zero exit."""
    exe = require_tool("dsr2html")
    proc = subprocess.run([exe, str(path)], capture_output=True, timeout=60)
    assert proc.returncode == 0, f"dsr2html failed: {proc.stderr.decode(errors='replace')}"
    return proc.stdout.decode("utf-8", errors="replace")


def cornerstone_load(
    sr: Path | str, images: Sequence[Path | str], seg: Path | str | None = None
) -> dict[str, Any]:
    """Load ``sr`` (and ``seg``) onto ``images`` as OHIF does; see tests/js/load_results.mjs.

    Returns ``{"measurements": [...], "warnings": [...], "seg": {...} | None}``. The npm
    packages come from ``scripts/install.sh --dev`` (``npm ci`` in tests/js).
    """
    node = require_tool("node")
    if not (JS_DIR / "node_modules" / "@cornerstonejs" / "adapters").is_dir():
        raise AssertionError("tests/js/node_modules is missing: run scripts/install.sh --dev")
    case = Path(sr).with_suffix(".case.json")
    case.write_text(
        json.dumps(
            {
                "sr": str(sr),
                "seg": str(seg) if seg is not None else None,
                "images": [str(p) for p in images],
            }
        )
    )
    proc = subprocess.run(
        [node, str(JS_DIR / "load_results.mjs"), str(case)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=JS_DIR,
    )
    assert proc.returncode == 0, f"load_results.mjs failed:\n{proc.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return out
