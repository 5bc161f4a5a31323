"""Shared fixtures: fresh data directories, free ports, the job table."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.store.db import Database, init_db


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    """Path of a peer program the test needs; a missing one is a set-up error, not a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `bash scripts/install.sh`")
    return path


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def anydb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated job table on SQLite and, where a server can be had, on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sub' / 'dir' / 'db.sqlite'}"  # parents are created
    else:
        url = request.getfixturevalue("pg_url")
    database = init_db(url)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = init_db(f"sqlite:///{tmp_path / 'airnode.sqlite'}")
    yield database
    database.dispose()
