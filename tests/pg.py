"""A PostgreSQL server for tests: the one in ``AIRNODE_TEST_POSTGRES_URL``, or a throwaway.

The throwaway server is initialised in a temporary directory, listens on a free port
on 127.0.0.1 only, runs as the ``postgres`` system user when the tests run as root
(the server refuses root), and is stopped (``-m immediate``) and deleted at the end of
the session.  Where neither is available the tests that need it are skipped.

Each test gets a fresh database (``pg_url`` fixture), so tests never see each
other's jobs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

ENV = "AIRNODE_TEST_POSTGRES_URL"
_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _pg_bin(name: str) -> str | None:
    for d in _BIN_DIRS:
        if (d / name).is_file():
            return str(d / name)
    return shutil.which(name)


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("running as root without runuser")
    return [runuser, "-u", "postgres", "--", *cmd]


def _reachable(url: str) -> str | None:
    """``None`` if a connection works, else why not (one line)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3):
            return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"


class _Server:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="airnode-pg-"))
        self.port = free_port()
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")

    def start(self) -> str:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError("PostgreSQL server binaries not found")
        subprocess.run(
            _as_server_user(
                [initdb, "-D", str(self.data), "--auth=trust", "-U", "postgres", "--no-sync"]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} "
            "-c fsync=off -c max_connections=50"
        )
        subprocess.run(
            _as_server_user(
                [
                    pg_ctl,
                    "-D",
                    str(self.data),
                    "-o",
                    opts,
                    "-w",
                    "-t",
                    "60",
                    "-l",
                    str(self.dir / "log"),
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=90,
        )
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        pg_ctl = _pg_bin("pg_ctl")
        try:
            if pg_ctl and (self.data / "postmaster.pid").exists():
                subprocess.run(
                    _as_server_user([pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"]),
                    capture_output=True,
                    timeout=60,
                )
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a PostgreSQL server's maintenance database; skips when there is none."""
    url = os.environ.get(ENV)
    if url:
        why = _reachable(url)
        if why is not None:
            pytest.skip(f"{ENV} is set but unreachable: {why}")
        yield url
        return
    server = _Server()
    try:
        try:
            url = server.start()
        except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
            pytest.skip(f"no PostgreSQL server could be started: {exc}")
        why = _reachable(url)
        if why is not None:
            pytest.skip(f"throwaway PostgreSQL server unreachable: {why}")
        yield url
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database on that server, dropped after the test."""
    import psycopg

    name = f"airnode_test_{uuid.uuid4().hex[:12]}"
    admin = pg_server.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = pg_server.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
