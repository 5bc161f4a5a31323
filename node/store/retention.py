"""Retention: what leaves the spool and the outbox, and when (``[retention]``).

A study is *finished* when it was scheduled (or found unrouted), no instance arrived
after that, and none of its jobs is unfinished (:data:`node.store.jobs.UNFINISHED`:
queued, running, or failed awaiting a retry).  Only a finished study's instances are
ever removed; ``dead`` jobs count as finished (an operator who wants to retry one has
``spool_keep_days`` to do so).  Three reasons remove something, oldest first:

``age``
    A finished study whose last job ended ``spool_keep_days`` ago; a result file whose
    send jobs are all finished (or that has none) made ``outbox_keep_days`` ago.
``watermark``
    The spool's file system is fuller than ``high_watermark_percent``: finished
    studies, then finished result files, whatever their age, until the use is back at
    ``low_watermark_percent``.
``emergency``
    Free space below ``emergency_free_bytes``: the same, checked on every scheduler
    pass, until free space is back above the floor and the use at the low watermark.

Each study is removed in batches, each in one write transaction that re-checks that
the study is still finished, with the study row locked (``BEGIN IMMEDIATE`` on
SQLite, ``FOR UPDATE`` on PostgreSQL; the scheduler locks the same row before it
queues jobs): the files are unlinked and their directories fsynced
(:func:`node.store.durable.remove_durable`), then the rows are deleted and one
``audit`` row per removed instance or result file is written.  A crash after the
unlink leaves rows without files, which the receiver's start-up reconciliation and
the next pass remove; never files without rows, which reconciliation would register
again.  Result rows stay as the record of what was produced.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import and_, delete, exists, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Exists

from node.config import NodeConfig, RetentionConfig
from node.logs import uid_tag
from node.store.db import AuditEvent, Database, Instance, Job, JobKind, Result, Study, StudyState
from node.store.db import now as wall_now
from node.store.durable import remove_durable
from node.store.jobs import UNFINISHED

__all__ = [
    "DiskUsage",
    "PurgeReport",
    "Removal",
    "Retention",
    "disk_usage",
    "purge",
]

log = logging.getLogger(__name__)

DAY_S = 86400.0
#: Instances removed per transaction: bounds how long the write lock is held.
BATCH = 500

Reason = Literal["age", "watermark", "emergency"]


@dataclass(frozen=True)
class DiskUsage:
    """Bytes of one file system, as :func:`shutil.disk_usage` gives them."""

    total: int
    used: int
    free: int

    @property
    def used_percent(self) -> float:
        return 100.0 * self.used / self.total if self.total else 0.0


UsageFn = Callable[[Path], DiskUsage]


def disk_usage(path: Path) -> DiskUsage:
    """The usage of the file system holding ``path`` (its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    u = shutil.disk_usage(p)
    return DiskUsage(total=u.total, used=u.used, free=u.free)


@dataclass(frozen=True)
class Removal:
    """One study's instances or one result file, removed (or listed by a dry run)."""

    kind: Literal["study", "result"]
    uid: str  # Study Instance UID, or the result's SOP Instance UID
    reason: Reason
    files: int
    bytes: int
    finished_at: float


@dataclass
class PurgeReport:
    dry_run: bool
    removals: list[Removal] = field(default_factory=list)
    before: DiskUsage | None = None
    after: DiskUsage | None = None
    #: Still above the high watermark or below the floor with nothing left to remove.
    short: bool = False

    @property
    def files(self) -> int:
        return sum(r.files for r in self.removals)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removals)


# -- what is finished -------------------------------------------------------------------


def _unfinished_job(study_uid: Any) -> Exists:
    return exists(
        select(Job.id).where(Job.study_instance_uid == study_uid, Job.status.in_(UNFINISHED))
    )


def _finished_clause() -> ColumnElement[bool]:
    return and_(
        Study.state.in_((StudyState.SCHEDULED, StudyState.UNROUTED)),
        Study.scheduled_at.is_not(None),
        Study.last_received_at <= Study.scheduled_at,
        ~_unfinished_job(Study.study_instance_uid),
    )


def _finished_studies(s: Session) -> list[tuple[int, str, float, int, int]]:
    """(id, UID, finished at, instance files, bytes) of finished studies that still
    hold instances, the oldest finished first."""
    last_job = (
        select(Job.study_instance_uid, func.max(Job.finished_at).label("last"))
        .where(Job.study_instance_uid.is_not(None))
        .group_by(Job.study_instance_uid)
        .subquery()
    )
    held = (
        select(
            Instance.study_instance_uid,
            func.count(Instance.id).label("n"),
            func.coalesce(func.sum(Instance.size), 0).label("size"),
        )
        .group_by(Instance.study_instance_uid)
        .subquery()
    )
    rows = s.execute(
        select(
            Study.id,
            Study.study_instance_uid,
            Study.scheduled_at,
            last_job.c.last,
            held.c.n,
            held.c.size,
        )
        .join(held, held.c.study_instance_uid == Study.study_instance_uid)
        .outerjoin(last_job, last_job.c.study_instance_uid == Study.study_instance_uid)
        .where(_finished_clause())
    ).all()
    out = [
        (int(i), str(uid), max(float(sched or 0.0), float(last or 0.0)), int(n), int(size))
        for i, uid, sched, last, n, size in rows
    ]
    out.sort(key=lambda r: (r[2], r[0]))
    return out


def _finished_results(s: Session, root: Path) -> list[tuple[int, str, Path, float, int]]:
    """(id, SOP Instance UID, file, made at, bytes) of result files on disk that no
    unfinished job needs, the oldest first.

    A result all of whose send jobs are ``done`` was removed by the sender already;
    left are those with no destination and those with a ``dead`` send job.
    """
    unfinished_send = exists(
        select(Job.id).where(
            Job.kind == JobKind.SEND,
            Job.result_sop_instance_uid == Result.sop_instance_uid,
            Job.status.in_(UNFINISHED),
        )
    )
    unfinished_infer = exists(
        select(Job.id).where(Job.id == Result.infer_job_id, Job.status.in_(UNFINISHED))
    )
    rows = s.execute(
        select(Result.id, Result.sop_instance_uid, Result.path, Result.created_at)
        .where(~unfinished_send, ~unfinished_infer)
        .order_by(Result.created_at, Result.id)
    ).all()
    out: list[tuple[int, str, Path, float, int]] = []
    for rid, uid, rel, made in rows:
        path = _inside(root, rel)
        if path is None:
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        out.append((int(rid), str(uid), path, float(made), size))
    return out


def _inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` when ``rel`` is a plain relative path (never outside ``root``)."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        return None
    return root / p


# -- removing ---------------------------------------------------------------------------


def _remove_study(
    db: Database, spool: Path, study_id: int, reason: Reason, t: float
) -> tuple[int, int]:
    """Remove a finished study's instances in batches; (files, bytes) removed.

    Each batch re-checks, under the study row's lock, that the study is still
    finished; a study that got a new job or instance since is left alone.
    """
    files = size = 0
    while True:
        with db.session() as s:
            st = s.scalar(
                select(Study).where(Study.id == study_id, _finished_clause()).with_for_update()
            )
            if st is None:
                break
            rows = s.execute(
                select(Instance.id, Instance.sop_instance_uid, Instance.path, Instance.size)
                .where(Instance.study_instance_uid == st.study_instance_uid)
                .order_by(Instance.id)
                .limit(BATCH)
            ).all()
            if not rows:
                break
            paths = [p for p in (_inside(spool, r.path) for r in rows) if p is not None]
            remove_durable(paths)
            s.execute(delete(Instance).where(Instance.id.in_([r.id for r in rows])))
            s.add_all(
                AuditEvent(
                    at=t,
                    event="purge_instance",
                    sop_instance_uid=r.sop_instance_uid,
                    detail=f"study {st.study_instance_uid}: {reason}",
                )
                for r in rows
            )
            st.instance_count = max(0, st.instance_count - len(rows))
            st.purged_at = t
            files += len(rows)
            size += sum(int(r.size) for r in rows)
        if len(rows) < BATCH:
            break
    return files, size


def _remove_result(db: Database, result_id: int, path: Path, reason: Reason, t: float) -> bool:
    """Remove one result file if no unfinished job needs it (checked again, locked)."""
    with db.session() as s:
        row = s.get(Result, result_id, with_for_update=True)
        if row is None:
            return False
        busy = s.scalar(
            select(func.count(Job.id)).where(
                or_(
                    and_(
                        Job.kind == JobKind.SEND,
                        Job.result_sop_instance_uid == row.sop_instance_uid,
                    ),
                    Job.id == row.infer_job_id,
                ),
                Job.status.in_(UNFINISHED),
            )
        )
        if busy:
            return False
        if not remove_durable([path]):
            return False
        s.add(
            AuditEvent(
                at=t,
                event="purge_result",
                sop_instance_uid=row.sop_instance_uid,
                detail=f"study {row.study_instance_uid}: {reason}",
            )
        )
        return True


# -- one pass ---------------------------------------------------------------------------


def purge(
    db: Database,
    cfg: NodeConfig,
    *,
    dry_run: bool = False,
    now: float | None = None,
    usage: UsageFn = disk_usage,
) -> PurgeReport:
    """One retention pass: by age, then by watermark or emergency floor.

    ``dry_run`` lists what would go without removing anything (the watermark part
    then assumes each removal frees the bytes its files hold).  ``usage`` measures the
    spool's file system (injectable for tests).
    """
    rc: RetentionConfig = cfg.retention
    spool, outbox = cfg.node.spool_dir, cfg.node.outbox_dir
    t = wall_now() if now is None else now
    report = PurgeReport(dry_run=dry_run, before=usage(spool))
    with db.read() as s:
        studies = _finished_studies(s)
        results = _finished_results(s, outbox)
    done_studies: set[int] = set()
    done_results: set[int] = set()
    freed = 0

    def take_study(row: tuple[int, str, float, int, int], reason: Reason) -> None:
        nonlocal freed
        sid, uid, fin, n, size = row
        if not dry_run:
            n, size = _remove_study(db, spool, sid, reason, t)
            if not n:
                return
        done_studies.add(sid)
        freed += size
        report.removals.append(Removal("study", uid, reason, n, size, fin))
        if not dry_run:
            log.info("retention: study %s, %d instance(s) removed (%s)", uid_tag(uid), n, reason)

    def take_result(row: tuple[int, str, Path, float, int], reason: Reason) -> None:
        nonlocal freed
        rid, uid, path, made, size = row
        if not dry_run and not _remove_result(db, rid, path, reason, t):
            return
        done_results.add(rid)
        freed += size
        report.removals.append(Removal("result", uid, reason, 1, size, made))

    if rc.spool_keep_days is not None:
        for row in studies:
            if row[2] <= t - rc.spool_keep_days * DAY_S:
                take_study(row, "age")
    if rc.outbox_keep_days is not None:
        for rrow in results:
            if rrow[3] <= t - rc.outbox_keep_days * DAY_S:
                take_result(rrow, "age")

    def current() -> DiskUsage:
        if not dry_run:
            return usage(spool)
        b = report.before
        assert b is not None
        return DiskUsage(b.total, max(0, b.used - freed), b.free + freed)

    def pressed(u: DiskUsage) -> Reason | None:
        if u.free < rc.emergency_free_bytes:
            return "emergency"
        if u.used_percent > rc.high_watermark_percent:
            return "watermark"
        return None

    def relieved(u: DiskUsage) -> bool:
        return u.free >= rc.emergency_free_bytes and u.used_percent <= rc.low_watermark_percent

    reason = pressed(current())
    if reason is not None:
        log.log(
            logging.ERROR if reason == "emergency" else logging.WARNING,
            "retention: %s clean-up: %.1f %% used, %d bytes free",
            reason,
            current().used_percent,
            current().free,
        )
        for row in [r for r in studies if r[0] not in done_studies]:
            if relieved(current()):
                break
            take_study(row, reason)
        for rrow in [r for r in results if r[0] not in done_results]:
            if relieved(current()):
                break
            take_result(rrow, reason)
        report.short = not relieved(current())
        if report.short:
            log.error(
                "retention: nothing more can be removed (every other study has unfinished "
                "jobs); %.1f %% used, %d bytes free",
                current().used_percent,
                current().free,
            )
    report.after = current()
    return report


class Retention:
    """The periodic pass of the scheduler stage (``[retention] enabled``).

    :meth:`tick` runs a pass every ``interval_s``; every tick measures the free space,
    and below ``emergency_free_bytes`` a pass runs at once, however recently the last
    one ran (at most every :attr:`EMERGENCY_EVERY_S`, so that a disk nothing more can
    be removed from does not turn the scheduler into a busy loop).
    """

    EMERGENCY_EVERY_S = 5.0

    def __init__(self, db: Database, cfg: NodeConfig, *, usage: UsageFn = disk_usage) -> None:
        self.db, self.cfg, self.usage = db, cfg, usage
        self._next = 0.0
        self._last = float("-inf")

    def tick(self, mono: float | None = None) -> PurgeReport | None:
        """Run a pass when one is due; its report, or ``None`` when none ran."""
        m = time.monotonic() if mono is None else mono
        rc = self.cfg.retention
        emergency = self.usage(self.cfg.node.spool_dir).free < rc.emergency_free_bytes
        if m < self._next and not (emergency and m >= self._last + self.EMERGENCY_EVERY_S):
            return None
        self._next = m + rc.interval_s
        self._last = m
        try:
            report = purge(self.db, self.cfg, usage=self.usage)
        except Exception:  # a failed pass must not stop the scheduling around it
            log.exception("retention pass failed; next one in %.0f s", rc.interval_s)
            return None
        if report.removals:
            log.info("retention: %d file(s), %d bytes removed", report.files, report.bytes)
        return report
