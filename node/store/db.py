"""The job table: SQLAlchemy 2 models and engine set-up (SQLite by default, PostgreSQL too).

SQLite runs in WAL mode with ``synchronous=FULL`` (a committed row survives power
loss, which the acknowledgement contract needs), a busy timeout, and every write
transaction opened with ``BEGIN IMMEDIATE`` so that two writers never deadlock on a
lock upgrade.  pysqlite's own transaction handling is switched off for that
(SQLAlchemy's documented recipe), since it would otherwise issue a plain ``BEGIN``.

Schema changes go through the Alembic migrations in ``node/store/migrations``.
Only ``airnode serve`` and ``airnode db upgrade`` migrate (:func:`init_db`); every
other process opens the database with :func:`open_db`, which refuses a schema that is
not the one this code was written for (:class:`SchemaError`, one line) instead of
changing it behind the operator's back.
"""

from __future__ import annotations

import enum
import os
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
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from node.errors import UserError

__all__ = [
    "AuditEvent",
    "Base",
    "CompleteRule",
    "Database",
    "DatabaseFileChanged",
    "Instance",
    "Job",
    "JobKind",
    "JobStatus",
    "Mpps",
    "Result",
    "SchemaError",
    "Study",
    "StudyState",
    "head_revision",
    "init_db",
    "now",
    "open_db",
    "schema_revision",
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
    #: When retention last removed instances of the study from the spool (``airnode purge``).
    purged_at: Mapped[float | None] = mapped_column(Float, nullable=True)


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
    __table_args__ = (Index("ix_jobs_claim", "kind", "status", "priority", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.QUEUED
    )
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Send jobs: where to, and which result object (the payload repeats them, typed,
    # in node.store.payloads); columns so that claiming and clean-up query them.
    destination: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    result_sop_instance_uid: Mapped[str | None] = mapped_column(
        String(64), nullable=True, index=True
    )
    #: Higher is claimed first (node.config.PRIORITY_LEVELS: routine = 100, stat = 300);
    #: a send job inherits its infer job's.
    priority: Mapped[int] = mapped_column(Integer, default=100, server_default="100")
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
    # The result object's own series: versions of a result share it (see results.md).
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(16))  # sr | sc | seg | pr
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


class DatabaseFileChanged(SQLAlchemyError):
    """The SQLite file this process opened was deleted or replaced since.

    Its connections still work, on the unlinked file: whatever is committed there is
    gone at the next start.  Nothing may be acknowledged on it.
    """


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """An engine plus a session factory, created once per process.

    ``busy_timeout_s`` bounds how long a statement waits for SQLite's write lock
    held by another process (the receiver keeps it short, so that a locked database
    gets 0xA700 before a sender's own timeout).
    """

    def __init__(self, url: str, *, echo: bool = False, busy_timeout_s: float = 30.0) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": busy_timeout_s, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        if self.is_sqlite:
            _configure_sqlite(self.engine, busy_timeout_s)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.file: Path | None = None
        self._identity: tuple[int, int] | None = None
        name = self.engine.url.database
        if self.is_sqlite and name and name != ":memory:":
            self.file = Path(name)
            try:
                with self.engine.connect():  # creates the file if missing
                    st = os.stat(self.file)
                self._identity = (st.st_dev, st.st_ino)
            except (SQLAlchemyError, OSError):
                pass  # unreachable: every statement will say so

    def file_problem(self) -> str | None:
        """Why the SQLite file opened by this process is no longer the one at its
        path (deleted, replaced) or cannot be written; ``None`` when it is fine."""
        if self.file is None or self._identity is None:
            return None
        try:
            st = os.stat(self.file)
        except OSError as exc:
            return f"database file {self.file.name} is gone ({exc.strerror})"
        if (st.st_dev, st.st_ino) != self._identity:
            return f"database file {self.file.name} was replaced while in use"
        if not os.access(self.file, os.W_OK) or not os.access(self.file.parent, os.W_OK):
            return f"database file {self.file.name} is read-only"
        return None

    def check_file(self) -> None:
        """Raise :class:`DatabaseFileChanged` when :meth:`file_problem` finds one."""
        problem = self.file_problem()
        if problem is not None:
            raise DatabaseFileChanged(problem)

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


class SchemaError(UserError):
    """The database's schema is not the one this airnode needs (message is one line)."""


def _alembic_config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _known_revisions() -> tuple[str, set[str]]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    head = script.get_current_head()
    assert head is not None, "no migrations found"
    return str(head), {str(r.revision) for r in script.walk_revisions()}


def head_revision() -> str:
    """The newest migration this code knows: the schema it was written for."""
    return _known_revisions()[0]


def schema_revision(db: Database) -> str | None:
    """The migration the database is at; ``None`` for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with db.engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
        conn.rollback()
    return None if rev is None else str(rev)


def _make_parent(url: str) -> None:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def open_db(url: str, *, busy_timeout_s: float = 30.0) -> Database:
    """Open the database at ``url`` for a stage: no migration, the schema is checked.

    Raises :class:`SchemaError` when the database is behind (or ahead of) this code.
    """
    _make_parent(url)
    db = Database(url, busy_timeout_s=busy_timeout_s)
    try:
        at = schema_revision(db)
        need, known = _known_revisions()
        if at is not None and at not in known:
            raise SchemaError(
                f"database schema is at {at}, newer than this airnode (which needs {need}): "
                "run the airnode version that upgraded it"
            )
        if at != need:
            raise SchemaError(
                f"database schema is at {at or 'none (empty database)'}, this airnode needs "
                f"{need}: run `airnode db upgrade`"
            )
    except BaseException:
        db.dispose()
        raise
    return db


def init_db(url: str, *, busy_timeout_s: float = 30.0) -> Database:
    """Open the database at ``url`` and upgrade it to the newest migration.

    For ``airnode serve`` (once, before any stage starts), ``airnode db upgrade`` and
    tests; stages use :func:`open_db`.
    """
    from alembic import command

    _make_parent(url)
    db = Database(url, busy_timeout_s=busy_timeout_s)
    cfg = _alembic_config()
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return db
