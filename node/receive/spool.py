"""The durable spool: how a received instance becomes a file plus a committed row.

This module knows nothing about the network; :mod:`node.receive.server` calls
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
import hashlib
import logging
import shutil
import uuid
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from node.logs import uid_tag
from node.receive.commit import GroupCommit, Row
from node.receive.headers import HeaderInfo, ParseError, check_uid, parse_header
from node.store.db import AuditEvent, Database, DatabaseFileChanged, Instance, now
from node.store.durable import link_durable, sha256_file, uid_path

__all__ = ["Spool", "Status", "StoreOutcome"]

log = logging.getLogger(__name__)

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
            digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(tmp)
            del data
            return self._store_checked(
                tmp, size, digest, info, transfer_syntax_uid, calling_ae, peer
            )
        except DatabaseFileChanged as exc:
            log.error("not storing %s: %s; restart airnode", tag, exc)
            return StoreOutcome(Status.OUT_OF_RESOURCES, "database file missing or replaced")
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
        created = link_durable(tmp, final)
        if not created and sha256_file(final) != digest:
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
        row = Row(info, rel, digest, size, transfer_syntax_uid, calling_ae, peer, now())
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
