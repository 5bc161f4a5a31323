"""Conformance checks other tests reuse: dicom3tools' dciodvfy and dcmtk's dsr2html."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import require_tool

__all__ = ["assert_dciodvfy_clean", "dciodvfy_messages", "dsr2html"]


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
