"""The airnode command line as a user meets it: usage errors, config errors, echo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.ops.cli import main
from tests.conftest import free_port

AIRNODE = [sys.executable, "-m", "node.ops.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIRNODE, *args], capture_output=True, text=True, timeout=60)


def test_unknown_command_is_a_usage_error_without_traceback() -> None:
    out = _run("no-such-command")
    assert out.returncode == 2
    assert "No such command" in out.stderr
    assert "Traceback" not in out.stderr


def test_version_and_help() -> None:
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.startswith("airnode ")
    help_text = _run("--help").stdout
    for cmd in ("serve", "receive", "schedule", "work", "send", "echo", "jobs", "demo"):
        assert cmd in help_text


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[node]\nport = 70000\n")
    out = _run("jobs", "list", "--config", str(cfg))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [lines[0]] and "node.port" in lines[0]


def test_echo_against_nothing_listening_fails_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["echo", "127.0.0.1", str(free_port()), "--timeout", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "C-ECHO" in err[0] and "failed" in err[0]
