"""The job table: migrations equal the models, SQLite durability settings, write locking."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError, StatementError

from node.store.db import (
    MIGRATIONS_DIR,
    Base,
    Database,
    Job,
    JobKind,
    JobStatus,
    SchemaError,
    init_db,
    now,
)
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)


def _job(key: str, status: str = "queued") -> Job:
    t = now()
    return Job(
        kind=JobKind.INFER,
        status=status,
        idempotency_key=key,
        payload={},
        attempts=0,
        max_attempts=3,
        not_before=0.0,
        created_at=t,
        updated_at=t,
    )


def test_migrations_produce_exactly_the_models(anydb: Database) -> None:
    with anydb.engine.connect() as conn:
        ctx = MigrationContext.configure(conn)
        assert compare_metadata(ctx, Base.metadata) == []
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        assert ctx.get_current_revision() == ScriptDirectory.from_config(cfg).get_current_head()
    tables = set(inspect(anydb.engine).get_table_names())
    assert {"instances", "studies", "jobs", "results", "audit"} <= tables


def test_init_db_twice_is_harmless(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    first = init_db(url)
    with first.session() as s:
        s.add(_job("k"))
    first.dispose()
    again = init_db(url)
    with again.read() as s:
        assert s.query(Job).count() == 1
    again.dispose()


def test_idempotency_key_is_unique_in_the_database(anydb: Database) -> None:
    with anydb.session() as s:
        s.add(_job("same"))
    with pytest.raises(IntegrityError), anydb.session() as s:
        s.add(_job("same"))


def test_status_outside_the_enum_is_refused(anydb: Database) -> None:
    with pytest.raises((StatementError, LookupError)), anydb.session() as s:
        s.add(_job("k", status="paused"))


def test_session_commits_and_rolls_back(anydb: Database) -> None:
    with pytest.raises(RuntimeError), anydb.session() as s:
        s.add(_job("lost"))
        s.flush()
        raise RuntimeError("handler failed")
    with anydb.session() as s:
        s.add(_job("kept"))
    with anydb.read() as s:
        assert [j.idempotency_key for j in s.query(Job)] == ["kept"]
        assert s.query(Job).one().status == JobStatus.QUEUED


def test_sqlite_is_durable_and_waits_for_locks(db: Database) -> None:
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def _other_writer(db: Database) -> sqlite3.Connection:
    path = db.url.removeprefix("sqlite:///")
    return sqlite3.connect(path, timeout=0.2, isolation_level=None)


def test_write_session_takes_the_write_lock_at_begin(db: Database) -> None:
    """``BEGIN IMMEDIATE``: two writers never both read, then both try to upgrade."""
    other = _other_writer(db)
    try:
        with db.session() as s:
            s.execute(text("SELECT 1"))  # no write yet, but the lock is already ours
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # free again after commit
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_read_session_does_not_block_writers(db: Database) -> None:
    other = _other_writer(db)
    try:
        with db.read() as s:
            s.execute(text("SELECT count(*) FROM jobs"))
            other.execute("BEGIN IMMEDIATE")
            other.execute(
                "INSERT INTO jobs (kind, status, idempotency_key, payload, attempts, "
                "max_attempts, not_before, created_at, updated_at) "
                "VALUES ('infer', 'queued', 'w', '{}', 0, 1, 0, 0, 0)"
            )
            other.execute("COMMIT")
    finally:
        other.close()
    with db.read() as s:
        assert s.query(Job).count() == 1


# ---------------------------------------------------- migration 0002: typed job columns


def test_migration_0002_moves_destination_and_result_uid_into_columns(tmp_path: Path) -> None:
    """A database created at 0001 with jobs in it: after the upgrade the send jobs'
    destination and result SOP Instance UID are columns (taken from their payloads),
    infer jobs have neither, and unfinished infer jobs get their kind's attempts."""
    from alembic import command

    from node.store.db import _alembic_config, head_revision, open_db, schema_revision

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    old = Database(url)
    cfg = _alembic_config()
    with old.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    assert schema_revision(old) == "0001"
    rows = [
        ("infer", "queued", "infer:1.2:m@1:abc", {"model": "m", "model_version": "1"}, 10),
        ("infer", "done", "infer:1.2:m@1:def", {"model": "m", "model_version": "1"}, 10),
        (
            "send",
            "done",
            "send:1.2.3.4:pacs",
            {
                "result_id": 1,
                "sop_instance_uid": "1.2.3.4",
                "path": "ab/c.dcm",
                "destination": "pacs",
            },
            10,
        ),
        (
            "send",
            "queued",
            "send:1.2.3.4:archive:b",
            {
                "result_id": 1,
                "sop_instance_uid": "1.2.3.4",
                "path": "ab/c.dcm",
                "destination": "archive:b",
            },
            25,
        ),
    ]
    with old.engine.begin() as conn:
        for kind, status, key, payload, max_attempts in rows:
            conn.execute(
                text(
                    "INSERT INTO jobs (kind, status, idempotency_key, payload, attempts, "
                    "max_attempts, not_before, created_at, updated_at) "
                    "VALUES (:k, :s, :key, :p, 0, :m, 0, 0, 0)"
                ),
                {"k": kind, "s": status, "key": key, "p": json.dumps(payload), "m": max_attempts},
            )
    with pytest.raises(SchemaError, match="database schema is at 0001"):
        open_db(url)
    old.dispose()

    db = init_db(url)
    assert schema_revision(db) == head_revision()
    with db.read() as s:
        got = {
            j.idempotency_key: (j.destination, j.result_sop_instance_uid, j.max_attempts)
            for j in s.query(Job)
        }
    assert got == {
        "infer:1.2:m@1:abc": (None, None, 3),
        "infer:1.2:m@1:def": (None, None, 10),  # finished: its record stays as it was
        "send:1.2.3.4:pacs": ("pacs", "1.2.3.4", 10),
        "send:1.2.3.4:archive:b": ("archive:b", "1.2.3.4", 25),
    }
    db.dispose()
