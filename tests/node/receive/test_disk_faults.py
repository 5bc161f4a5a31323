"""The database and the spool fail under a running receiver: nothing is acknowledged
that is not durable, and ``/health`` says so."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.ops.http.health import health
from node.ops.synthetic import ct_series
from node.store.db import Database, init_db
from tests.node.receive import test_server
from tests.node.receive.test_server import Node

pytestmark = pytest.mark.integration

make_node = test_server.make_node  # the receiver-process fixture


def _store(port: int, seed: int) -> int:
    ds = ct_series(1, 16, 16, seed=seed)[0]
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="AIRNODE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_deleted_or_replaced_database_is_never_acknowledged_into(make_node, how: str) -> None:  # type: ignore[no-untyped-def]
    node: Node = make_node()
    assert _store(node.port, 1) == 0x0000
    db_file = node.data_dir / "airnode.sqlite"
    if how == "deleted":
        for p in node.data_dir.glob("airnode.sqlite*"):
            p.unlink()
    else:  # a restored backup moved over the live file
        copy = node.data_dir / "restored.sqlite"
        shutil.copy(db_file, copy)
        copy.replace(db_file)
    assert _store(node.port, 2) == 0xA700
    assert _store(node.port, 3) == 0xA700


def test_health_fails_when_the_database_file_is_deleted_or_the_spool_unwritable(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'airnode.sqlite'}"
    init_db(url).dispose()
    db = Database(url)
    try:
        (tmp_path / "spool" / "tmp").mkdir(parents=True)
        assert health(db, tmp_path, 0, lambda: None)[0] == 200
        shutil.rmtree(tmp_path / "spool" / "tmp")
        (tmp_path / "spool" / "tmp").write_text("not a directory")
        code, body = health(db, tmp_path, 0, lambda: None)
        assert code == 503 and body["checks"]["spool"]["ok"] is False
        (tmp_path / "spool" / "tmp").unlink()
        for p in tmp_path.glob("airnode.sqlite*"):
            p.unlink()
        code, body = health(db, tmp_path, 0, lambda: None)
        assert code == 503
        assert "gone" in body["checks"]["database"]["error"]
    finally:
        db.dispose()


def test_a_locked_database_gets_a700_within_the_configured_bound(make_node) -> None:  # type: ignore[no-untyped-def]
    node: Node = make_node(extra="[security]\ndb_lock_timeout_s = 1.0")
    assert _store(node.port, 1) == 0x0000
    con = sqlite3.connect(node.data_dir / "airnode.sqlite", isolation_level=None, timeout=30)
    try:
        con.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        t = time.monotonic()
        status = _store(node.port, 2)
        elapsed = time.monotonic() - t
        assert status == 0xA700
        # Before the bound, the C-STORE blocked for SQLite's 30 s busy timeout.
        assert elapsed < 10, elapsed
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert _store(node.port, 2) == 0x0000  # and stores again once the lock is gone
    rows = sqlite3.connect(node.data_dir / "airnode.sqlite").execute(
        "SELECT count(*) FROM instances"
    )
    assert rows.fetchone()[0] == 2
