"""The outbox: result objects kept durably on disk until every destination has them.

:func:`store_results` is idempotent end to end. The object's file name comes from a
hash of its SOP Instance UID (never the UID text), the write is
temp → fsync → rename → fsync(dir), and both the ``results`` row and the ``send``
jobs (idempotency key ``send:<SOP Instance UID>:<destination>``) are inserted only if
missing. A worker that crashed and re-ran the same infer job produces the same
deterministic UIDs, so a re-run re-creates nothing.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from pydicom import Dataset, dcmwrite
from sqlalchemy import select

from node.logs import uid_tag
from node.store.db import Database, Job, JobKind, JobStatus, Result, now
from node.store.durable import fsync_dir, uid_path, write_durable
from node.store.jobs import DEFAULT_PRIORITY, enqueue
from node.store.payloads import SendPayload

__all__ = [
    "cleanup",
    "latest_in_series",
    "object_kind",
    "outbox_path",
    "send_key",
    "store_results",
]

log = logging.getLogger(__name__)

_KINDS = {
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.33": "sr",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22": "sr",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.7": "sc",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.11.1": "pr",  # Grayscale Softcopy Presentation State
}


def object_kind(ds: Dataset) -> str:
    """``sr``, ``sc``, ``seg`` or ``pr`` from the SOP Class; anything else is ``other``."""
    return _KINDS.get(str(ds.SOPClassUID), "other")


def outbox_path(sop_instance_uid: str) -> str:
    """The file's path relative to the outbox: ``ab/<sha256 of the UID>.dcm``."""
    return uid_path(sop_instance_uid).as_posix()


def send_key(sop_instance_uid: str, destination: str) -> str:
    """The idempotency key of the send job of one object to one destination."""
    return f"send:{sop_instance_uid}:{destination}"


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def store_results(
    db: Database,
    outbox_dir: Path | str,
    datasets: Sequence[Dataset],
    *,
    model: str,
    infer_job_id: int | None,
    destinations: list[str],
    max_attempts: int | None = None,
    objects: Mapping[str, Collection[str]] | None = None,
    priority: int = DEFAULT_PRIORITY,
) -> list[Result]:
    """Write ``datasets`` to the outbox, record them, queue one send per destination.

    ``objects`` maps a destination to the object kinds it takes (:func:`object_kind`:
    ``sr``, ``seg``, ``sc``, ``pr``; ``[[destinations]] objects`` in the config); a
    destination not in it takes all. The send jobs get ``priority``, the infer job's,
    so a STAT study's results are also sent first. Returns the ``results`` rows (existing ones when
    this is a re-run).
    """
    if not model:
        raise ValueError("store_results: model must not be empty")
    if len(set(destinations)) != len(destinations):
        raise ValueError(f"store_results: destinations has duplicates: {destinations}")
    root = Path(outbox_dir)
    rows: list[Result] = []
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        rel = outbox_path(uid)
        target = root / rel
        if not target.exists():
            write_durable(target, _encode(ds))
        with db.session() as s:
            row = s.scalar(select(Result).where(Result.sop_instance_uid == uid))
            if row is None:
                row = Result(
                    sop_instance_uid=uid,
                    sop_class_uid=str(ds.SOPClassUID),
                    study_instance_uid=str(ds.StudyInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    kind=object_kind(ds),
                    model=model,
                    path=rel,
                    infer_job_id=infer_job_id,
                    created_at=now(),
                )
                s.add(row)
                s.flush()
            rows.append(row)
        queued = 0
        for dest in destinations:
            if objects is not None and dest in objects and row.kind not in objects[dest]:
                continue
            queued += 1
            enqueue(
                db,
                JobKind.SEND,
                send_key(uid, dest),
                SendPayload(result_id=row.id, sop_instance_uid=uid, path=rel, destination=dest),
                study_instance_uid=str(ds.StudyInstanceUID),
                max_attempts=max_attempts,
                parent_id=infer_job_id,
                priority=priority,
            )
        log.info("outbox: %s %s for %d destination(s)", row.kind, uid_tag(uid), queued)
    return rows


def latest_in_series(
    db: Database, series_instance_uid: str, sop_instance_uid: str
) -> tuple[str, str] | None:
    """``(SOP Class UID, SOP Instance UID)`` of the newest other object in a result series.

    ``sop_instance_uid`` is the object about to be made. When it already exists (a
    re-run on the same input), the answer is the newest object recorded *before* it,
    so the re-run names the same predecessor as the first run did.
    """
    with db.read() as s:
        own = s.scalar(select(Result.id).where(Result.sop_instance_uid == sop_instance_uid))
        query = select(Result.sop_class_uid, Result.sop_instance_uid).where(
            Result.series_instance_uid == series_instance_uid,
            Result.sop_instance_uid != sop_instance_uid,
        )
        if own is not None:
            query = query.where(Result.id < own)
        row = s.execute(query.order_by(Result.id.desc()).limit(1)).first()
    return (str(row[0]), str(row[1])) if row is not None else None


def cleanup(db: Database, outbox_dir: Path | str) -> int:
    """Delete outbox files that every destination has acknowledged; returns how many.

    An object with no send job at all (no destination configured) stays on disk, as
    does one with any job not ``done`` (queued, running, failed, or dead awaiting an
    operator's retry). The ``results`` row stays as the record of what was produced.
    """
    root = Path(outbox_dir)
    statuses: dict[str, set[JobStatus]] = {}
    with db.read() as s:
        for uid, status in s.execute(
            select(Job.result_sop_instance_uid, Job.status).where(
                Job.kind == JobKind.SEND, Job.result_sop_instance_uid.is_not(None)
            )
        ):
            statuses.setdefault(str(uid), set()).add(JobStatus(status))
        results = s.execute(select(Result.sop_instance_uid, Result.path)).all()
    removed = 0
    for uid, rel in results:
        st = statuses.get(uid)
        if not st or st != {JobStatus.DONE}:
            continue
        path = root / rel
        if path.exists():
            path.unlink()
            removed += 1
    if removed:
        fsync_dir(root) if root.exists() else None
    return removed
