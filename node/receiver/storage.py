"""The durable spool: how a received instance becomes a file plus a committed row.

This module knows nothing about the network; :mod:`node.receiver.server` calls
:meth:`Spool.store` from its C-STORE handler and turns the :class:`StoreOutcome` into
a DIMSE status.  Keeping it separate lets the acknowledgement contract be tested
without sockets.

The order of operations is the contract (design guide, "acknowledgement contract"):
temp file in ``spool/tmp`` (same file system) → ``fsync`` → ``link`` to the final
name → ``fsync`` of the directory → ``instances`` + ``studies`` + ``audit`` rows in
one transaction (shared with concurrent stores, see :class:`GroupCommit`) → only then
success.  A crash anywhere before the commit leaves at
most a temp file or a file without a row, which :meth:`Spool.reconcile` cleans up at
the next start.

File names are a SHA-256 of the SOP Instance UID (never the UID text, so a UID such
as ``../../x`` can never name a path), fanned out as ``ab/<hash>.dcm``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import queue
import re
import shutil
import threading
import uuid
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import pydicom
from sqlalchemy import insert, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from node.db import AuditEvent, Database, Instance, Study, StudyState, now
from node.logs import uid_tag

__all__ = [
    "HeaderInfo",
    "ParseError",
    "Spool",
    "Status",
    "StoreOutcome",
    "check_uid",
    "parse_header",
    "uid_path",
]

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TMP_SUFFIX = ".part"
_READ_WHOLE = 64 * 1024 * 1024  # larger instances are parsed and hashed from the file


class Status(IntEnum):
    """C-STORE response statuses this node sends (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    #: Refused: Out of Resources. Transient: the sender should retry later.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class (UIDs differ from the command, bad UID).
    DATASET_MISMATCH = 0xA900
    #: Error: Cannot understand (0xCxxx range): the data set cannot be parsed.
    CANNOT_UNDERSTAND = 0xC210
    #: Error: Cannot understand: the instance exceeds ``max_instance_bytes`` (permanent).
    TOO_LARGE = 0xC001


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one C-STORE request; ``comment`` goes into ErrorComment."""

    status: Status
    comment: str = ""
    duplicate: bool = False
    path: Path | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class HeaderInfo:
    """The few attributes the node needs from a data set header (no PHI)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None


class ParseError(ValueError):
    """The data set cannot be parsed (truncated, garbage, missing identifying UIDs)."""


def check_uid(value: str | None) -> str | None:
    """Why ``value`` is not a conformant UID (PS3.5 §9.1), or ``None`` when it is."""
    if value is None or value == "":
        return "UID is empty"
    if len(value) > 64:
        return f"UID is {len(value)} characters long (more than 64)"
    if not _UID_RE.match(value):
        return "UID has characters other than digits and dots, or a leading zero"
    return None


def uid_path(uid: str) -> Path:
    """The spool-relative path of an instance: ``ab/<sha256(uid)>.dcm``.

    One level of 256 directories: a new directory costs two extra fsyncs, so a
    deeper fan-out (65,536 leaves) would make most of the first 100,000 instances
    pay them; ext4/XFS index large directories, so a few million files stay cheap.
    """
    digest = hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()
    return Path(digest[:2], digest + ".dcm")


def parse_header(source: bytes | Path) -> HeaderInfo:
    """Read the identifying UIDs from a Part 10 file or byte stream without decoding pixels.

    Values over 4 KiB are not read (``defer_size``), so a multi-gigabyte instance
    costs no memory; a value that would end past the end of the stream means the
    data set was truncated, which pydicom itself would silently accept.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(source, bytes):
                total = len(source)
                ds = pydicom.dcmread(io.BytesIO(source), defer_size=4096)
            else:
                total = source.stat().st_size
                ds = pydicom.dcmread(source, defer_size=4096)
            for raw in ds._dict.values():
                length = getattr(raw, "length", None)
                tell = getattr(raw, "value_tell", None)
                if (
                    length is not None
                    and tell is not None
                    and length != 0xFFFFFFFF
                    and tell + length > total
                ):
                    raise ParseError(f"element {raw.tag} is truncated")
            info = HeaderInfo(
                sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
                sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
                study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
                series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                modality=(str(ds.get("Modality")) if ds.get("Modality") else None),
            )
    except ParseError:
        raise
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise ParseError(f"cannot parse data set: {type(exc).__name__}") from None
    if not info.sop_class_uid and not info.sop_instance_uid:
        raise ParseError("data set has neither SOP Class UID nor SOP Instance UID")
    return info


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class _Row:
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
        self._queue: queue.SimpleQueue[tuple[_Row, Future[bool]]] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def submit(self, row: _Row) -> bool:
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
                batch: list[tuple[_Row, Future[bool]]] = []
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if not batch:
                    continue
                try:
                    results = self._apply([r for r, _ in batch])
                except Exception as exc:
                    for _, f in batch:
                        f.set_exception(exc)
                else:
                    for (_, f), inserted in zip(batch, results, strict=True):
                        f.set_result(inserted)
        return fut.result()

    def _apply(self, rows: list[_Row]) -> list[bool]:
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

    def _apply_locked(self, rows: list[_Row]) -> list[bool]:
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
            new: list[_Row] = []
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
            per_study: dict[str, list[_Row]] = {}
            for r in new:
                per_study.setdefault(r.info.study_instance_uid, []).append(r)
            for key, group in per_study.items():
                last = max(r.at for r in group)
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


class Spool:
    """The spool directory plus the ``instances``/``studies`` rows that index it.

    Parameters
    ----------
    root:
        The spool directory (``data_dir/spool``); created if missing.
    db:
        The job table.
    min_free_bytes:
        Space that must stay free after writing an instance; below it the node
        answers 0xA700 so that the disk never fills up completely.
    max_instance_bytes:
        Largest data set accepted; a larger one is refused with 0xC001.
    """

    def __init__(
        self,
        root: Path,
        db: Database,
        *,
        min_free_bytes: int = 0,
        max_instance_bytes: int = 2 * 1024**3,
    ) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        if max_instance_bytes < 1:
            raise ValueError(f"max_instance_bytes must be >= 1, got {max_instance_bytes}")
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.db = db
        self.min_free_bytes = min_free_bytes
        self.max_instance_bytes = max_instance_bytes
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._committer = GroupCommit(
            db, lock_path=self.root / ".commit.lock" if db.is_sqlite else None
        )

    # ------------------------------------------------------------------ store
    def temp_path(self) -> Path:
        """A fresh temp file name in the spool's own file system (rename stays atomic)."""
        return self.tmp / f"{uuid.uuid4().hex}{_TMP_SUFFIX}"

    def store(
        self,
        data: bytes,
        *,
        command_sop_class_uid: str,
        command_sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_ae: str,
        peer: str | None,
    ) -> StoreOutcome:
        """Store a complete Part 10 byte stream (preamble, meta, data set); see
        :meth:`store_file`."""
        if len(data) > self.max_instance_bytes:
            return self._too_large(len(data))
        tmp = self.temp_path()
        try:
            try:
                with tmp.open("xb") as f:
                    f.write(data)
            except OSError as exc:
                return StoreOutcome(Status.OUT_OF_RESOURCES, f"I/O error: {exc.strerror or exc}")
            return self.store_file(
                tmp,
                command_sop_class_uid=command_sop_class_uid,
                command_sop_instance_uid=command_sop_instance_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                calling_ae=calling_ae,
                peer=peer,
            )
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _too_large(self, size: int) -> StoreOutcome:
        return StoreOutcome(
            Status.TOO_LARGE,
            f"instance of {size} bytes exceeds max_instance_bytes {self.max_instance_bytes}",
        )

    def store_file(
        self,
        tmp: Path,
        *,
        command_sop_class_uid: str,
        command_sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_ae: str,
        peer: str | None,
    ) -> StoreOutcome:
        """Make one received instance durable, then return the status to send.

        ``tmp`` is a complete Part 10 file (PS3.10 §7.1: preamble, ``DICM``, File
        Meta Information, then the data set exactly as received) in ``spool/tmp``.
        It is fsynced and hard-linked to its final name (the caller removes the temp
        name); the SHA-256 of those bytes is recorded in the row.  Never raises:
        every failure becomes a status (PS3.4 Annex B.2.3).
        """
        try:
            size = tmp.stat().st_size
        except OSError as exc:
            return StoreOutcome(Status.OUT_OF_RESOURCES, f"I/O error: {exc.strerror or exc}")
        if size > self.max_instance_bytes:
            return self._too_large(size)
        for label, uid in (
            ("Affected SOP Instance UID", command_sop_instance_uid),
            ("Affected SOP Class UID", command_sop_class_uid),
        ):
            why = check_uid(uid)
            if why:
                return StoreOutcome(Status.DATASET_MISMATCH, f"{label}: {why}")
        try:
            # One read serves both the header parse and the hash when it fits.
            data = tmp.read_bytes() if size <= _READ_WHOLE else None
            info = parse_header(data if data is not None else tmp)
        except ParseError as exc:
            return StoreOutcome(Status.CANNOT_UNDERSTAND, str(exc))
        if info.sop_instance_uid != command_sop_instance_uid:
            return StoreOutcome(
                Status.DATASET_MISMATCH, "SOP Instance UID in the data set differs from the command"
            )
        if info.sop_class_uid != command_sop_class_uid:
            return StoreOutcome(
                Status.DATASET_MISMATCH, "SOP Class UID in the data set differs from the command"
            )
        for label, uid in (
            ("Study Instance UID", info.study_instance_uid),
            ("Series Instance UID", info.series_instance_uid),
        ):
            why = check_uid(uid)
            if why:
                return StoreOutcome(Status.DATASET_MISMATCH, f"{label}: {why}")
        tag = uid_tag(info.sop_instance_uid)
        try:
            digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256_file(tmp)
            del data
            return self._store_checked(
                tmp, size, digest, info, transfer_syntax_uid, calling_ae, peer
            )
        except OperationalError as exc:
            log.error("database unavailable while storing %s: %s", tag, type(exc.orig).__name__)
            return StoreOutcome(Status.OUT_OF_RESOURCES, "database locked or unavailable")
        except SQLAlchemyError as exc:
            log.error("database error while storing %s: %s", tag, type(exc).__name__)
            return StoreOutcome(Status.OUT_OF_RESOURCES, "database error")
        except OSError as exc:
            log.error("I/O error while storing %s: %s", tag, exc.strerror or type(exc).__name__)
            return StoreOutcome(Status.OUT_OF_RESOURCES, f"I/O error: {exc.strerror or exc}")

    def _existing(self, sop_instance_uid: str) -> tuple[str, str] | None:
        with self.db.read() as s:
            row = s.execute(
                select(Instance.sha256, Instance.path).where(
                    Instance.sop_instance_uid == sop_instance_uid
                )
            ).first()
        return (row[0], row[1]) if row else None

    def _duplicate(self, info: HeaderInfo, digest: str, existing: tuple[str, str]) -> StoreOutcome:
        old_digest, rel = existing
        if old_digest != digest:
            # Keep the first copy (like Orthanc's default and dcm4chee's overwrite
            # policy NEVER): jobs may already have run on it.  Logged and audited.
            log.warning(
                "instance %s received again with different content; keeping the first copy",
                uid_tag(info.sop_instance_uid),
            )
            return StoreOutcome(
                Status.SUCCESS,
                "duplicate SOP Instance UID with different content; first copy kept",
                duplicate=True,
                path=self.root / rel,
                sha256=old_digest,
            )
        return StoreOutcome(Status.SUCCESS, duplicate=True, path=self.root / rel, sha256=old_digest)

    def _store_checked(
        self,
        tmp: Path,
        size: int,
        digest: str,
        info: HeaderInfo,
        transfer_syntax_uid: str,
        calling_ae: str,
        peer: str | None,
    ) -> StoreOutcome:
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            log.error("disk space below reserve (%d bytes free)", free)
            return StoreOutcome(
                Status.OUT_OF_RESOURCES,
                f"disk space below reserve ({free} bytes free, {self.min_free_bytes} reserved)",
            )
        rel = uid_path(info.sop_instance_uid)
        final = self.root / rel
        created = self._make_durable(tmp, final)
        if not created and _sha256_file(final) != digest:
            # The name is taken by other bytes: a committed first copy (kept), or
            # the same UID arriving right now on another association (retry later;
            # orphans from a crash were dealt with by reconcile() at start-up).
            existing = self._existing(info.sop_instance_uid)
            if existing is None:
                return StoreOutcome(
                    Status.OUT_OF_RESOURCES, "same SOP Instance UID is being stored; retry"
                )
            outcome = self._duplicate(info, digest, existing)
            self._audit("duplicate-conflict", calling_ae, peer, info.sop_instance_uid)
            return outcome
        try:
            inserted = self._commit(info, rel, digest, size, transfer_syntax_uid, calling_ae, peer)
        except SQLAlchemyError:
            # No row means the file must not stay: remove it unless another
            # association committed the same UID meanwhile.
            if created and self._existing_quiet(info.sop_instance_uid) is None:
                with contextlib.suppress(OSError):
                    final.unlink()
            raise
        if not inserted:
            existing = self._existing(info.sop_instance_uid)
            if existing is None:
                return StoreOutcome(Status.OUT_OF_RESOURCES, "database conflict; retry")
            self._audit("duplicate", calling_ae, peer, info.sop_instance_uid)
            return self._duplicate(info, digest, existing)
        log.debug("stored %s (%d bytes)", uid_tag(info.sop_instance_uid), size)
        return StoreOutcome(Status.SUCCESS, path=final, sha256=digest)

    def _existing_quiet(self, uid: str) -> tuple[str, str] | None:
        try:
            return self._existing(uid)
        except SQLAlchemyError:
            return None

    def _make_durable(self, tmp: Path, final: Path) -> bool:
        """fsync the temp file → link it to its final name → fsync the directory.

        ``link`` never replaces: False when the name already existed (nothing was
        changed then).
        """
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        parent = final.parent
        if not parent.is_dir():
            parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(parent.parent)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        _fsync_dir(parent)
        return True

    def _commit(
        self,
        info: HeaderInfo,
        rel: Path,
        digest: str,
        size: int,
        transfer_syntax_uid: str,
        calling_ae: str,
        peer: str | None,
    ) -> bool:
        """Insert the instance and upsert its study, committed before returning; False
        if the SOP Instance UID was committed meanwhile (another association)."""
        row = _Row(info, rel, digest, size, transfer_syntax_uid, calling_ae, peer, now())
        return self._committer.submit(row)

    def _audit(self, event: str, calling_ae: str, peer: str | None, uid: str | None) -> None:
        with self.db.session() as s:
            s.add(
                AuditEvent(
                    at=now(),
                    event=event,
                    ae_title=calling_ae[:16],
                    peer=(peer or "")[:128] or None,
                    sop_instance_uid=uid,
                )
            )

    # -------------------------------------------------------------- reconcile
    def reconcile(self) -> dict[str, int]:
        """Bring the spool and the ``instances`` table back in line after a crash.

        - temp files are deleted (an unacknowledged transfer);
        - a file without a row (crash between link and commit) is registered again
          when it parses completely and its name matches its UID, else deleted;
        - a row without a file is deleted (and logged).

        Must run before any association is accepted.  Returns counts per action.
        """
        counts = {"temp_removed": 0, "registered": 0, "orphans_removed": 0, "rows_removed": 0}
        for entry in self.tmp.iterdir():
            if entry.is_dir():  # a receiver process's own temp directory
                counts["temp_removed"] += sum(1 for p in entry.rglob("*") if p.is_file())
                shutil.rmtree(entry, ignore_errors=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                counts["temp_removed"] += 1
        with self.db.read() as s:
            rows = {
                p: (i, u)
                for i, u, p in s.execute(
                    select(Instance.id, Instance.sop_instance_uid, Instance.path)
                )
            }
        on_disk: set[str] = set()
        for path in self.root.glob("[0-9a-f][0-9a-f]/*.dcm"):
            rel = path.relative_to(self.root).as_posix()
            on_disk.add(rel)
            if rel in rows:
                continue
            if self._reregister(path, rel):
                counts["registered"] += 1
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                counts["orphans_removed"] += 1
        missing = [(i, u) for p, (i, u) in rows.items() if p not in on_disk]
        if missing:
            with self.db.session() as s:
                for row_id, uid in missing:
                    log.warning("instance %s has a row but no file; row removed", uid_tag(uid))
                    obj = s.get(Instance, row_id)
                    if obj is not None:
                        s.delete(obj)
            counts["rows_removed"] = len(missing)
        if any(counts.values()):
            log.info("spool reconciled: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
        return counts

    def _reregister(self, path: Path, rel: str) -> bool:
        try:
            data = path.read_bytes()
            info = parse_header(data)
        except (OSError, ParseError):
            return False
        if uid_path(info.sop_instance_uid).as_posix() != rel:
            return False
        ts = "1.2.840.10008.1.2"
        with contextlib.suppress(Exception):
            meta = pydicom.filereader.read_file_meta_info(path)
            ts = str(meta.TransferSyntaxUID)
        inserted = self._commit(
            info, Path(rel), hashlib.sha256(data).hexdigest(), len(data), ts, "", None
        )
        if inserted:
            log.info("re-registered %s found without a row", uid_tag(info.sop_instance_uid))
        return inserted
