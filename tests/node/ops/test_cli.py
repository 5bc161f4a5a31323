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


# ------------------------------------------- only serve and `db upgrade` migrate


def _alembic_version(db_file: Path) -> list[str]:
    import sqlite3

    con = sqlite3.connect(db_file)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "alembic_version" not in tables:
            return []
        return [r[0] for r in con.execute("SELECT version_num FROM alembic_version")]
    finally:
        con.close()


def test_stages_refuse_a_database_behind_their_schema_until_db_upgrade(tmp_path: Path) -> None:
    """``receive``, ``schedule``, ``work``, ``send`` and operator commands check the
    schema and never migrate; ``airnode db upgrade`` does, after which they start."""
    from node.store.db import head_revision

    cfg = tmp_path / "airnode.toml"
    cfg.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\nport = {free_port()}\n'
        '[inference]\nbackend = "fake"\n[http]\nenabled = false\n'
    )
    db_file = tmp_path / "data" / "airnode.sqlite"
    need = head_revision()
    expected = (
        f"airnode: database schema is at none (empty database), this airnode needs {need}: "
        "run `airnode db upgrade`"
    )
    for cmd in (["receive"], ["schedule"], ["work"], ["send"], ["jobs", "list"]):
        out = _run(*cmd, "--config", str(cfg))
        assert out.returncode == 2, (cmd, out.stderr)
        assert out.stderr.strip().splitlines()[-1] == expected, (cmd, out.stderr)
        assert "Traceback" not in out.stderr
        assert _alembic_version(db_file) == []  # refused, and left alone
    assert _run("db", "revision", "--config", str(cfg)).returncode == 1
    up = _run("db", "upgrade", "--config", str(cfg))
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"database schema is at {need}"
    assert _alembic_version(db_file) == [need]
    rev = _run("db", "revision", "--config", str(cfg))
    assert rev.returncode == 0 and f"is at {need}, this airnode needs {need}" in rev.stdout
    listed = _run("jobs", "list", "--config", str(cfg))
    assert listed.returncode == 0, listed.stderr
