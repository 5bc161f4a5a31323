"""Job queue operations on the job table: enqueue, claim, heartbeat, finish, reap.

A job is claimed in one atomic statement::

    UPDATE jobs SET status='running', lease_owner=…, lease_expires_at=…, attempts=attempts+1
    WHERE id = (SELECT id FROM jobs WHERE kind=… AND status IN ('queued','failed')
                AND not_before <= now ORDER BY priority DESC, not_before, id
                LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING …

The highest ``priority`` goes first (a STAT study overtakes a queue of routine ones),
then the oldest: the earliest due (``not_before``; 0 for a job never tried), then the
first queued (``id``).

On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets many workers claim side by side.  On
SQLite that clause compiles to nothing, which is safe only because every write
transaction starts with ``BEGIN IMMEDIATE`` (see :mod:`node.store.db`): the whole statement
runs under the database's single write lock.

Retries come from a :class:`RetryPolicy` and only for transient errors
(:class:`TransientJobError`); anything else ends the job ``dead`` with its reason.
The policy belongs to the job's kind (:func:`retry_policies`, one table): a job's
``max_attempts`` is written from it when the job is queued, so a job crashed by its
process is given up after its own kind's attempts whichever process reaps it.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.config import PRIORITY_LEVELS, SendPolicyConfig
from node.store.db import TRANSITIONS, Database, Job, JobKind, JobStatus, now
from node.store.payloads import JobPayload, SendPayload

#: What a job carries: the typed payload of its kind (node.store.payloads); a plain
#: mapping is stored as it is (the job layer's own tests use that).
Payload = JobPayload | Mapping[str, Any]

__all__ = [
    "JobError",
    "PermanentJobError",
    "RetryPolicy",
    "TransientJobError",
    "cancel",
    "claim",
    "complete",
    "default_owner",
    "enqueue",
    "enqueue_in",
    "fail",
    "heartbeat",
    "reap_expired",
    "retry",
    "retry_policies",
]

CLAIMABLE = (JobStatus.QUEUED, JobStatus.FAILED)
#: Jobs of a study in these states are not finished: retention keeps the study's files.
UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED)
DEFAULT_PRIORITY = PRIORITY_LEVELS["routine"]


class JobError(Exception):
    """Base class of errors a job handler raises to say how its job ended."""


class TransientJobError(JobError):
    """Worth trying again later: association refused/aborted, timeout, 0xA7xx."""


class PermanentJobError(JobError):
    """Trying again cannot help: 0xA9xx, 0xCxxx, permanent rejection, bad input, model error."""


class IllegalTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential back-off with full jitter, for transient errors only."""

    max_attempts: int = 10
    base_delay_s: float = 2.0
    max_delay_s: float = 300.0
    jitter: float = 0.5  # share of the delay that is randomised

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.base_delay_s <= 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("need 0 < base_delay_s <= max_delay_s")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be within [0, 1]")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        raw = min(self.max_delay_s, self.base_delay_s * (2.0 ** max(0, attempt - 1)))
        r = (rng or random).random()
        return raw * (1.0 - self.jitter) + raw * self.jitter * r


def retry_policies(send: SendPolicyConfig | None = None) -> dict[JobKind, RetryPolicy]:
    """The retry policy of each job kind: the one table every stage reads.

    ``infer``: a model error rarely heals, so few attempts with a short back-off.
    ``send``: a PACS may be down for hours; ``[send]`` in the configuration sets its
    attempts and back-off.
    """
    send = send or SendPolicyConfig()
    return {
        JobKind.INFER: RetryPolicy(max_attempts=3, base_delay_s=5.0, max_delay_s=60.0),
        JobKind.SEND: RetryPolicy(
            max_attempts=send.max_attempts,
            base_delay_s=send.base_delay_s,
            max_delay_s=max(send.max_delay_s, send.base_delay_s),
        ),
    }


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def key_digest(*parts: str) -> str:
    """A short stable digest for idempotency keys built from many UIDs."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _stored(payload: Payload) -> dict[str, Any]:
    return payload.dump() if isinstance(payload, JobPayload) else dict(payload)


def _check(old: JobStatus, new: JobStatus) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"job cannot go from {old} to {new}")


class EnqueueOptions(TypedDict, total=False):
    """The keyword arguments of :func:`enqueue_in`, which :func:`enqueue` passes on."""

    study_instance_uid: str | None
    max_attempts: int | None
    not_before: float
    parent_id: int | None
    priority: int


def enqueue(
    db: Database, kind: JobKind, key: str, payload: Payload, **options: Unpack[EnqueueOptions]
) -> tuple[int, bool]:
    """Insert a job unless one with ``key`` exists. Returns ``(job id, created)``.

    ``max_attempts`` defaults to the kind's policy (:func:`retry_policies`).
    """
    with db.session() as s:
        return enqueue_in(s, kind, key, payload, **options)


def enqueue_in(
    s: Session,
    kind: JobKind,
    key: str,
    payload: Payload,
    *,
    study_instance_uid: str | None = None,
    max_attempts: int | None = None,
    not_before: float = 0.0,
    parent_id: int | None = None,
    priority: int = DEFAULT_PRIORITY,
) -> tuple[int, bool]:
    """:func:`enqueue` inside the caller's write transaction ``s``.

    For callers whose job must exist if and only if their own rows change in the same
    transaction (the scheduler marks a study scheduled and queues its jobs at once).
    A racing insert of the same key (PostgreSQL) is absorbed by a savepoint.
    ``priority``: higher is claimed first (:data:`node.config.PRIORITY_LEVELS`).
    """
    if max_attempts is None:
        max_attempts = retry_policies()[kind].max_attempts
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if isinstance(payload, JobPayload) and payload.kind != kind:
        raise ValueError(f"a {type(payload).__name__} is not the payload of a {kind} job")
    existing = s.scalar(select(Job.id).where(Job.idempotency_key == key))
    if existing is not None:
        return existing, False
    t = now()
    send = payload if isinstance(payload, SendPayload) else None
    job = Job(
        kind=kind,
        status=JobStatus.QUEUED,
        idempotency_key=key,
        study_instance_uid=study_instance_uid,
        payload=_stored(payload),
        destination=send.destination if send else None,
        result_sop_instance_uid=send.sop_instance_uid if send else None,
        attempts=0,
        max_attempts=max_attempts,
        not_before=not_before,
        created_at=t,
        updated_at=t,
        parent_id=parent_id,
        priority=priority,
    )
    try:
        with s.begin_nested():
            s.add(job)
    except IntegrityError:  # a racing process inserted it first
        jid = s.scalar(select(Job.id).where(Job.idempotency_key == key))
        if jid is None:
            raise
        return jid, False
    return job.id, True


def claim(
    db: Database,
    kind: JobKind,
    owner: str,
    lease_s: float = 120.0,
    *,
    extra_where: Sequence[Any] = (),
) -> Job | None:
    """Atomically take the next due job of ``kind``; ``None`` when there is none."""
    t = now()
    pick = (
        select(Job.id)
        .where(Job.kind == kind, Job.status.in_(CLAIMABLE), Job.not_before <= t, *extra_where)
        .order_by(Job.priority.desc(), Job.not_before, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(Job)
        .where(Job.id == pick)
        .values(
            status=JobStatus.RUNNING,
            lease_owner=owner,
            lease_expires_at=t + lease_s,
            attempts=Job.attempts + 1,
            updated_at=t,
        )
        .returning(Job)
        .execution_options(synchronize_session=False)
    )
    with db.session() as s:
        return s.scalars(stmt).first()


def heartbeat(db: Database, job_id: int, owner: str, lease_s: float = 120.0) -> bool:
    """Extend a running job's lease; ``False`` if the job is no longer ours."""
    t = now()
    with db.session() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
            .values(lease_expires_at=t + lease_s, updated_at=t)
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]


def _finish(
    db: Database,
    job_id: int,
    owner: str | None,
    new: JobStatus,
    *,
    error: str | None = None,
    not_before: float | None = None,
    payload: Payload | None = None,
) -> bool:
    t = now()
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        if owner is not None and (job.status != JobStatus.RUNNING or job.lease_owner != owner):
            return False  # the lease was lost (reaped); someone else owns the job now
        _check(job.status, new)
        job.status = new
        job.updated_at = t
        job.lease_owner = None
        job.lease_expires_at = None
        if error is not None:
            job.last_error = error[:4000]
        if not_before is not None:
            job.not_before = not_before
        if payload is not None:
            job.payload = _stored(payload)
        if new in (JobStatus.DONE, JobStatus.DEAD):
            job.finished_at = t
        return True


def complete(db: Database, job_id: int, owner: str, payload: Payload | None = None) -> bool:
    """Mark a running job done. ``False`` if its lease had been lost."""
    return _finish(db, job_id, owner, JobStatus.DONE, payload=payload)


def fail(
    db: Database,
    job: Job,
    owner: str,
    error: BaseException | str,
    policy: RetryPolicy,
    *,
    transient: bool | None = None,
) -> JobStatus | None:
    """Record a failed attempt: back off and retry if transient, else ``dead``.

    ``transient`` defaults to whether ``error`` is a :class:`TransientJobError`.
    Returns the new status, or ``None`` if the lease had been lost.
    """
    if transient is None:
        transient = isinstance(error, TransientJobError)
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    attempts_left = job.attempts < min(job.max_attempts, policy.max_attempts)
    if transient and attempts_left:
        nb = now() + policy.delay(job.attempts)
        ok = _finish(db, job.id, owner, JobStatus.FAILED, error=reason, not_before=nb)
        return JobStatus.FAILED if ok else None
    if transient:
        reason = f"gave up after {job.attempts} attempts: {reason}"
    ok = _finish(db, job.id, owner, JobStatus.DEAD, error=reason)
    return JobStatus.DEAD if ok else None


def reap_expired(db: Database) -> int:
    """Return running jobs whose lease expired (their process died) to the queue.

    The one reaper: whichever process calls it, a job that keeps killing its process
    ends ``dead`` once the attempts of its kind (its ``max_attempts``) are used up.
    """
    t = now()
    n = 0
    with db.session() as s:
        expired = s.scalars(
            select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < t)
        ).all()
        for job in expired:
            msg = f"lease of {job.lease_owner} expired (worker stopped?)"
            if job.attempts >= job.max_attempts:
                job.status = JobStatus.DEAD
                job.finished_at = t
                msg = f"gave up after {job.attempts} attempts: {msg}"
            else:
                job.status = JobStatus.FAILED
                job.not_before = t
            job.last_error = msg
            job.lease_owner = None
            job.lease_expires_at = None
            job.updated_at = t
            n += 1
    return n


def _not_running(s: Session, job_id: int, new: JobStatus, why: str) -> Job:
    """The job an operator acts on, refused while running (its process goes on)."""
    job = s.get(Job, job_id)
    if job is None:
        raise KeyError(f"no job {job_id}")
    if job.status == JobStatus.RUNNING:
        raise IllegalTransition(
            f"job cannot go from {job.status} to {new}: {job.lease_owner} {why}"
        )
    _check(job.status, new)
    return job


def retry(db: Database, job_id: int) -> Job:
    """Operator action: put a dead, failed or done job back in the queue now.

    A running job is refused: its worker may still be alive.  Requeueing under a live
    lease would run the job twice; the reaper requeues it if its worker is really gone.
    """
    t = now()
    with db.session() as s:
        job = _not_running(
            s, job_id, JobStatus.QUEUED, "holds its lease; wait for it to end or expire"
        )
        job.status = JobStatus.QUEUED
        job.not_before = t
        job.attempts = 0
        job.finished_at = None
        job.updated_at = t
        return job


def cancel(db: Database, job_id: int, reason: str = "cancelled by operator") -> Job:
    """Operator action: end a queued or failed job (``dead``); running ones cannot be."""
    t = now()
    with db.session() as s:
        job = _not_running(s, job_id, JobStatus.DEAD, "is running it; wait for it to end")
        job.status = JobStatus.DEAD
        job.last_error = reason
        job.finished_at = t
        job.updated_at = t
        return job


def counts(db: Database) -> dict[tuple[str, str], int]:
    """Number of jobs per (kind, status), for metrics and the status page."""
    with db.read() as s:
        rows = s.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status))
        return {(str(k), str(st)): int(c) for k, st, c in rows}
