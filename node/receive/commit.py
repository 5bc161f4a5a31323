"""Group commit: the rows of concurrent C-STOREs committed in one transaction.

A handler thread returns only once the transaction holding its row has committed, so
the acknowledgement contract is unchanged; what is saved is one WAL fsync and one turn
at SQLite's write lock per batch instead of per instance.
"""

from __future__ import annotations

import fcntl
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import insert, select, update

from node.receive.headers import HeaderInfo
from node.store.db import AuditEvent, Database, Instance, Study, StudyState

__all__ = ["GroupCommit", "Row"]


@dataclass(frozen=True)
class Row:
    info: HeaderInfo
    rel: Path
    digest: str
    size: int
    transfer_syntax_uid: str
    calling_ae: str
    peer: str | None
    at: float


class GroupCommit:
    """Commits the rows of concurrent C-STOREs together, one transaction per batch.

    Each handler thread queues its row and returns only once the transaction
    holding it has committed (so the acknowledgement contract is unchanged).  While
    one transaction commits, the rows arriving meanwhile queue up and go into the next:
    with several associations this turns N commits (N WAL fsyncs, N turns at
    SQLite's write lock with its busy-wait back-off) into one.  The existence check
    runs inside the write transaction, so no two processes can insert one UID.
    """

    def __init__(self, db: Database, max_batch: int = 128, lock_path: Path | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.db = db
        self.lock_path = lock_path
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Row, Future[bool]]] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def submit(self, row: Row) -> bool:
        """Commit ``row``; True when inserted, False when its UID already had a row.

        Leader/follower: whoever holds the lock commits everything queued so far,
        its own row included; the others wait for the lock and find their row done
        (or lead the next batch).  No extra thread, so a lone association pays no
        hand-off.
        """
        fut: Future[bool] = Future()
        self._queue.put((row, fut))
        while not fut.done():
            with self._lock:
                if fut.done():
                    break
                batch: list[tuple[Row, Future[bool]]] = []
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if not batch:
                    continue
                try:
                    results = self._apply([r for r, _ in batch])
                    # After the commit: a file deleted or replaced before or during
                    # it took the rows with it, so none of them may be acknowledged.
                    self.db.check_file()
                except Exception as exc:
                    for _, f in batch:
                        f.set_exception(exc)
                else:
                    for (_, f), inserted in zip(batch, results, strict=True):
                        f.set_result(inserted)
        return fut.result()

    def _apply(self, rows: list[Row]) -> list[bool]:
        if self.lock_path is None:
            return self._apply_locked(rows)
        # Receiver processes queue on a file lock (woken at once on release) instead
        # of SQLite's busy handler, which sleeps 1-100 ms between retries.
        with self.lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._apply_locked(rows)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _apply_locked(self, rows: list[Row]) -> list[bool]:
        # Core statements, not ORM objects: this runs once per batch under the
        # write lock, so its CPU time is everybody's latency.
        with self.db.session() as s:
            uids = {r.info.sop_instance_uid for r in rows}
            seen = set(
                s.scalars(
                    select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids))
                )
            )
            results: list[bool] = []
            new: list[Row] = []
            for r in rows:
                fresh = r.info.sop_instance_uid not in seen
                results.append(fresh)
                if fresh:
                    seen.add(r.info.sop_instance_uid)
                    new.append(r)
            if not new:
                return results
            s.execute(
                insert(Instance),
                [
                    {
                        "sop_instance_uid": r.info.sop_instance_uid,
                        "sop_class_uid": r.info.sop_class_uid,
                        "study_instance_uid": r.info.study_instance_uid,
                        "series_instance_uid": r.info.series_instance_uid,
                        "modality": r.info.modality,
                        "transfer_syntax_uid": r.transfer_syntax_uid,
                        "path": r.rel.as_posix(),
                        "sha256": r.digest,
                        "size": r.size,
                        "calling_ae": r.calling_ae[:16],
                        "peer_host": (r.peer or "")[:64] or None,
                        "received_at": r.at,
                    }
                    for r in new
                ],
            )
            per_study: dict[str, list[Row]] = {}
            for r in new:
                per_study.setdefault(r.info.study_instance_uid, []).append(r)
            for key, group in per_study.items():
                last = max(r.at for r in group)
                # The newest stated count wins (node.schedule: the "count" rule).
                counts = [c for r in group if (c := r.info.study_related_instances)]
                announced = {"expected_instances": counts[-1]} if counts else {}
                found = s.execute(
                    select(Study.id).where(Study.study_instance_uid == key)
                ).scalar_one_or_none()
                if found is None:
                    s.execute(
                        insert(Study).values(
                            study_instance_uid=key,
                            first_received_at=min(r.at for r in group),
                            last_received_at=last,
                            state=StudyState.RECEIVING,
                            instance_count=len(group),
                            **announced,
                        )
                    )
                else:
                    # New data for a study already evaluated goes back to
                    # `receiving`, so the scheduler looks at it again.
                    s.execute(
                        update(Study)
                        .where(Study.id == found)
                        .values(
                            last_received_at=last,
                            instance_count=Study.instance_count + len(group),
                            state=StudyState.RECEIVING,
                            **announced,
                        )
                    )
            s.execute(
                insert(AuditEvent),
                [
                    {
                        "at": r.at,
                        "event": "received",
                        "ae_title": r.calling_ae[:16],
                        "peer": (r.peer or "")[:128] or None,
                        "sop_instance_uid": r.info.sop_instance_uid,
                        "detail": f"{r.size} bytes",
                    }
                    for r in new
                ],
            )
        return results
