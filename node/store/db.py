"""The job table: SQLAlchemy 2 models and engine set-up (SQLite by default, PostgreSQL too).

SQLite runs in WAL mode with ``synchronous=FULL`` (a committed row survives power
loss, which the acknowledgement contract needs), a busy timeout, and every write
transaction opened with ``BEGIN IMMEDIATE`` so that two writers never deadlock on a
lock upgrade.  pysqlite's own transaction handling is switched off for that
(SQLAlchemy's documented recipe), since it would otherwise issue a plain ``BEGIN``.

Schema changes go through the Alembic migrations in ``node/store/migrations``;
:func:`init_db` upgrades a database to the newest revision.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = [
    "Base",
    "CompleteRule",
    "Database",
    "Instance",
    "Job",
    "JobKind",
    "JobStatus",
    "Mpps",
    "Result",
    "Study",
    "StudyState",
    "init_db",
    "now",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def now() -> float:
    """Wall-clock seconds since the epoch; all table times use this unit."""
    return time.time()


class Base(DeclarativeBase):
    pass


class JobKind(enum.StrEnum):
    INFER = "infer"
    SEND = "send"


class JobStatus(enum.StrEnum):
    """Life cycle of a job.

    ::

        queued ──claim──▶ running ──complete──▶ done
           ▲                │
           │                ├─transient error, attempts left──▶ failed ──(not_before passed)──┐
           │                ├─permanent error or attempts used up──▶ dead                      │
           │                └─lease expired (reaper)──▶ failed / dead                          │
           └────────────── retry (operator) ◀── dead / failed      claim ◀─────────────────────┘

    ``failed`` jobs are waiting for their back-off (``not_before``) and are claimed
    again like ``queued`` ones; ``dead`` jobs stay until an operator retries them.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"


#: Allowed transitions; :mod:`node.store.jobs` refuses any other.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.DEAD}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.DONE, JobStatus.FAILED, JobStatus.DEAD, JobStatus.QUEUED}
    ),
    JobStatus.FAILED: frozenset({JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.DEAD}),
    JobStatus.DEAD: frozenset({JobStatus.QUEUED}),
    JobStatus.DONE: frozenset({JobStatus.QUEUED}),
}


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # instances still arriving (or not yet looked at)
    SCHEDULED = "scheduled"  # routes evaluated, infer jobs created
    UNROUTED = "unrouted"  # routes evaluated, none matched


class CompleteRule(enum.StrEnum):
    """Which rule found a study complete (``studies.complete_rule``); see docs/jobs.md.

    The first three are exact signals; ``stable`` and ``forced`` are the time rules.
    """

    RETRIEVE = "retrieve"  # a C-MOVE/C-GET we started ended with every sub-operation done
    MPPS = "mpps"  # MPPS COMPLETED and every instance it lists has arrived
    COUNT = "count"  # the instance count the headers announce has arrived
    STABLE = "stable"  # no instance for study.stable_after_s
    FORCED = "forced"  # study.force_after_s after the first instance of the burst


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        validate_strings=True,
        values_callable=lambda e: [m.value for m in e],
        length=16,
    )


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    first_received_at: Mapped[float] = mapped_column(Float)
    last_received_at: Mapped[float] = mapped_column(Float, index=True)
    state: Mapped[StudyState] = mapped_column(
        _enum(StudyState, "study_state"), default=StudyState.RECEIVING, index=True
    )
    scheduled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: When an exact signal said the study is complete; it holds only while no
    #: instance arrived after it (``complete_at >= last_received_at``).
    complete_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: The :class:`CompleteRule` value that completed it (set by whoever saw it).
    complete_rule: Mapped[str | None] = mapped_column(String(16), nullable=True)
    #: Number of Study Related Instances (0020,1208) stated by the newest instance
    #: that has it; the study is complete when exactly that many have arrived.
    expected_instances: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Mpps(Base):
    """A Modality Performed Procedure Step (PS3.4 Annex F.7) received by N-CREATE/N-SET.

    ``referenced`` lists the SOP Instance UIDs of its Performed Series Sequence
    (images and non-image objects); ``status`` is the Performed Procedure Step Status
    (``IN PROGRESS``, ``COMPLETED``, ``DISCONTINUED``).
    """

    __tablename__ = "mpps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16))
    referenced: Mapped[list[str]] = mapped_column(JSON, default=list)
    calling_ae: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))  # relative to the spool directory
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(64), nullable=True)
    received_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "kind", "status", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.QUEUED
    )
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=10)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True
    )


class Result(Base):
    """A DICOM object the node produced and keeps in the outbox until delivered."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # sr | sc | seg
    model: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(String(512))  # relative to the outbox directory
    infer_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[float] = mapped_column(Float)


class AuditEvent(Base):
    """Who sent what, and what was sent where (UIDs only, no PHI)."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    event: Mapped[str] = mapped_column(String(32))
    ae_title: Mapped[str | None] = mapped_column(String(16), nullable=True)
    peer: Mapped[str | None] = mapped_column(String(128), nullable=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """An engine plus a session factory, created once per process."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on success."""
        with self._sessions() as sess, sess.begin():
            yield sess

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction that takes no write lock on SQLite."""
        sess = self._sessions(bind=self.engine.execution_options(sqlite_begin="DEFERRED"))
        with sess, sess.begin():
            yield sess

    def dispose(self) -> None:
        self.engine.dispose()


def init_db(url: str) -> Database:
    """Open the database at ``url`` and upgrade it to the newest migration."""
    from alembic import command
    from alembic.config import Config

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    db = Database(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return db
