"""Delivery of result objects to DICOM destinations (C-STORE SCU) and DICOMweb ones
(STOW-RS, :mod:`node.deliver.dicomweb`), with retries.

Each destination has its own thread that claims only that destination's ``send`` jobs
(``extra_where`` on the job's ``destination`` column), so a destination that is down,
slow or refusing never holds up the others: its jobs back off while the rest flow. Due jobs are sent
in batches, one association per destination batch.

Negotiation (PS3.8 Section 9.3.2.2): each SOP class is proposed with the file's own
transfer syntax plus Explicit and Implicit VR Little Endian; pynetdicom converts
between uncompressed syntaxes itself, and a compressed file is decompressed when the
destination accepts only uncompressed ones.

Outcomes follow :mod:`node.deliver.status`; association-level failures: refused
connection, abort, timeout and transient rejection retry; a permanent rejection
(A-ASSOCIATE-RJ result 1) ends the batch's jobs ``dead`` with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, build_context
from sqlalchemy import or_

from node.config import DestinationConfig, NodeConfig
from node.deliver.dicomweb import WebError, stow
from node.deliver.status import Outcome, classify, describe
from node.dimse import client_tls_context
from node.logs import uid_tag
from node.store import jobs
from node.store.db import AuditEvent, Database, Job, JobKind, JobStatus, now
from node.store.outbox import cleanup
from node.store.payloads import PayloadError, SendPayload

__all__ = ["Sender"]

log = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass
class _Item:
    job: Job
    ds: Dataset


def _destination_of(name: str) -> Any:
    return Job.destination == name


class Sender:
    """Sends the due ``send`` jobs of each destination; one instance per process."""

    def __init__(
        self,
        cfg: NodeConfig,
        db: Database,
        *,
        owner: str | None = None,
        batch_size: int = 16,
        poll_s: float = 0.25,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.cfg = cfg
        self.db = db
        self.owner = owner or jobs.default_owner()
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.outbox = Path(cfg.node.outbox_dir)
        self.lease_s = cfg.send.lease_s
        self.policy = jobs.retry_policies(cfg.send)[JobKind.SEND]

    # -- claiming -------------------------------------------------------------------

    def _claim_batch(self, dest: DestinationConfig) -> list[Job]:
        out: list[Job] = []
        while len(out) < self.batch_size:
            job = jobs.claim(
                self.db,
                JobKind.SEND,
                f"{self.owner}/{dest.name}",
                self.lease_s,
                extra_where=[_destination_of(dest.name)],
            )
            if job is None:
                break
            out.append(job)
        return out

    def _owner(self, dest: DestinationConfig) -> str:
        return f"{self.owner}/{dest.name}"

    def _fail(self, dest: DestinationConfig, job: Job, reason: str, *, transient: bool) -> None:
        status = jobs.fail(
            self.db, job, self._owner(dest), reason, self.policy, transient=transient
        )
        uid = job.result_sop_instance_uid or ""
        level = logging.WARNING if status == JobStatus.DEAD else logging.INFO
        log.log(level, "send %s to %s: %s → %s", uid_tag(uid), dest.name, reason, status)

    def _done(self, dest: DestinationConfig, job: Job, status: int | str) -> None:
        uid = job.result_sop_instance_uid or ""
        shown = describe(status) if isinstance(status, int) else status
        if not jobs.complete(self.db, job.id, self._owner(dest)):
            log.warning("send %s to %s: lease lost before completion", uid_tag(uid), dest.name)
            return
        with self.db.session() as s:
            s.add(
                AuditEvent(
                    at=now(),
                    event="sent",
                    ae_title=dest.ae_title,
                    peer=(f"{dest.host}:{dest.port}" if dest.kind == "dimse" else dest.url or "")[
                        :128
                    ],
                    sop_instance_uid=uid,
                    detail=f"destination={dest.name} status={shown}",
                )
            )
        log.info("sent %s to %s (%s)", uid_tag(uid), dest.name, shown)

    # -- one batch --------------------------------------------------------------------

    def _paths(self, dest: DestinationConfig, batch: list[Job]) -> dict[str, tuple[Job, Path]]:
        """The outbox file of each job, by SOP Instance UID (jobs without one end dead)."""
        out: dict[str, tuple[Job, Path]] = {}
        for job in batch:
            try:
                rel = SendPayload.of(job).path
            except PayloadError as exc:
                self._fail(dest, job, str(exc), transient=False)
                continue
            path = self.outbox / rel
            if not path.is_file():
                self._fail(dest, job, f"outbox file missing: {rel}", transient=False)
                continue
            out[job.result_sop_instance_uid or str(job.id)] = (job, path)
        return out

    def _send_web(self, dest: DestinationConfig, batch: list[Job]) -> int:
        """STOW-RS one batch (one request); each job ends by its instance's outcome."""
        items = self._paths(dest, batch)
        if not items:
            return len(batch)
        try:
            result = stow(dest, {uid: path for uid, (_, path) in items.items()})
        except WebError as exc:
            for job, _ in items.values():
                self._fail(dest, job, str(exc), transient=exc.transient)
            return len(batch)
        except OSError as exc:  # an outbox file vanished while the body was sent
            for job, _ in items.values():
                self._fail(dest, job, f"{type(exc).__name__}: {exc}", transient=True)
            return len(batch)
        for uid, (job, _) in items.items():
            outcome, reason = result.results[uid]
            if outcome is Outcome.SUCCESS:
                self._done(dest, job, f"STOW-RS HTTP {result.http_status}")
            else:
                self._fail(dest, job, reason, transient=outcome is Outcome.TRANSIENT)
        return len(batch)

    def _load(self, dest: DestinationConfig, batch: list[Job]) -> list[_Item]:
        items: list[_Item] = []
        for job in batch:
            try:
                rel = SendPayload.of(job).path
            except PayloadError as exc:
                self._fail(dest, job, str(exc), transient=False)
                continue
            path = self.outbox / rel
            try:
                ds = dcmread(path)
            except FileNotFoundError:
                self._fail(dest, job, f"outbox file missing: {rel}", transient=False)
                continue
            except Exception as exc:
                self._fail(dest, job, f"outbox file unreadable: {rel}: {exc}", transient=False)
                continue
            items.append(_Item(job, ds))
        return items

    @contextmanager
    def _associate(self, dest: DestinationConfig, items: list[_Item]) -> Iterator[Association]:
        ae_title, host, port = dest.dimse_peer()
        ae = AE(ae_title=dest.calling_ae_title or self.cfg.node.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
        if dest.max_pdu:
            ae.maximum_pdu_size = dest.max_pdu
        syntaxes: dict[str, list[str | UID]] = {}
        for it in items:
            ts = UID(str(it.ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
            lst = syntaxes.setdefault(str(it.ds.SOPClassUID), [])
            for s in (ts, *_UNCOMPRESSED):
                if s not in lst:
                    lst.append(s)
        contexts = [build_context(sop, ts) for sop, ts in list(syntaxes.items())[:128]]
        tls_args = None
        if dest.tls is not None:
            ctx = client_tls_context(dest.tls.cert, dest.tls.key, dest.tls.ca)
            tls_args = (ctx, host)
        assoc = ae.associate(host, port, contexts=contexts, ae_title=ae_title, tls_args=tls_args)
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def send_batch(self, dest: DestinationConfig) -> int:
        """Claim and send one batch of due jobs for ``dest``; returns how many were handled."""
        batch = self._claim_batch(dest)
        if not batch:
            return 0
        if dest.kind == "dicomweb":
            return self._send_web(dest, batch)
        items = self._load(dest, batch)
        if not items:
            return len(batch)
        pending = list(items)
        try:
            with self._associate(dest, items) as assoc:
                if not assoc.is_established:
                    reason, transient = self._association_failure(dest, assoc)
                    for it in items:
                        self._fail(dest, it.job, reason, transient=transient)
                    return len(batch)
                while pending:
                    if not assoc.is_established:
                        for rest in pending:
                            self._fail(dest, rest.job, "association aborted", transient=True)
                        break
                    self._send_one(dest, assoc, pending.pop(0))
                    for rest in pending:
                        jobs.heartbeat(self.db, rest.job.id, self._owner(dest), self.lease_s)
        except Exception as exc:  # TLS set-up, socket errors: retry what is left
            log.warning("send to %s: %s: %s", dest.name, type(exc).__name__, exc)
            for rest in pending:
                self._fail(dest, rest.job, f"{type(exc).__name__}: {exc}", transient=True)
        return len(batch)

    def _association_failure(self, dest: DestinationConfig, assoc: Association) -> tuple[str, bool]:
        where = dest.address
        if assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            result = getattr(rsp, "result", None)
            detail = (
                f"{getattr(rsp, 'result_str', '?')}, source: {getattr(rsp, 'source_str', '?')}, "
                f"reason: {getattr(rsp, 'reason_str', '?')}"
            )
            if result == 0x01:
                return f"association rejected permanently by {where}: {detail}", False
            return f"association rejected transiently by {where}: {detail}", True
        rsp = assoc.acceptor.primitive
        if rsp is not None and getattr(rsp, "result", None) == 0x00:
            # Accepted, but none of the proposed SOP class / transfer syntax pairs.
            return f"{where} accepts none of the proposed presentation contexts", False
        return f"no association with {where} (unreachable, refused or timed out)", True

    def _send_one(self, dest: DestinationConfig, assoc: Association, it: _Item) -> None:
        ds, job = it.ds, it.job
        sop_class = str(ds.SOPClassUID)
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
        if not accepted:
            self._fail(
                dest,
                job,
                f"{dest.name} does not accept SOP class {sop_class} (no presentation context)",
                transient=False,
            )
            return
        ts = UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
        accepted_ts = {str(cx.transfer_syntax[0]) for cx in accepted}
        if ts.is_compressed and str(ts) not in accepted_ts:
            try:
                # Same instance, only re-encoded: keep its SOP Instance UID (pydicom
                # would otherwise generate a new one).
                ds.decompress(generate_instance_uid=False)
            except Exception as exc:
                self._fail(dest, job, f"cannot decompress for {dest.name}: {exc}", transient=False)
                return
        try:
            rsp = assoc.send_c_store(ds)
        except Exception as exc:  # encoding or network error mid-operation
            self._fail(dest, job, f"C-STORE failed: {type(exc).__name__}: {exc}", transient=True)
            return
        code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        outcome = classify(code)
        if outcome is Outcome.SUCCESS:
            assert code is not None
            self._done(dest, job, code)
            return
        comment = str(rsp.get("ErrorComment", "")) if rsp is not None else ""
        reason = f"C-STORE to {dest.name}: {describe(code)}" + (f": {comment}" if comment else "")
        self._fail(dest, job, reason, transient=outcome is Outcome.TRANSIENT)

    # -- loops ------------------------------------------------------------------------

    def run_destination(self, dest: DestinationConfig, stop: threading.Event) -> None:
        """Send ``dest``'s due jobs until ``stop`` is set."""
        while not stop.is_set():
            try:
                handled = self.send_batch(dest)
            except Exception:
                log.exception("sender for %s: unexpected error; retrying", dest.name)
                handled = 0
            if handled == 0:
                stop.wait(self.poll_s)

    def fail_unknown_destinations(self) -> int:
        """End jobs whose destination is no longer configured (dead, with the reason)."""
        names = [d.name for d in self.cfg.destinations]
        n = 0
        while True:
            job = jobs.claim(
                self.db,
                JobKind.SEND,
                self.owner,
                self.lease_s,
                extra_where=[or_(Job.destination.is_(None), Job.destination.not_in(names))],
            )
            if job is None:
                return n
            reason = f"unknown destination {job.destination!r} (not in config)"
            jobs.fail(self.db, job, self.owner, reason, self.policy, transient=False)
            n += 1

    def housekeeping(self) -> None:
        """End jobs for unknown destinations, prune the outbox.

        Expired leases are the scheduler's reaper's (:func:`node.store.jobs.reap_expired`).
        """
        self.fail_unknown_destinations()
        removed = cleanup(self.db, self.outbox)
        if removed:
            log.info("outbox: removed %d delivered object(s)", removed)

    def run(self, stop: threading.Event, *, housekeeping_s: float = 5.0) -> None:
        """One thread per destination, housekeeping here, until ``stop`` is set."""
        threads = [
            threading.Thread(
                target=self.run_destination, args=(d, stop), name=f"send-{d.name}", daemon=True
            )
            for d in self.cfg.destinations
        ]
        for t in threads:
            t.start()
        try:
            while not stop.is_set():
                try:
                    self.housekeeping()
                except Exception:
                    log.exception("sender housekeeping failed; retrying")
                stop.wait(housekeeping_s)
        finally:
            stop.set()
            deadline = time.monotonic() + max(
                (d.timeout_s for d in self.cfg.destinations), default=0.0
            )
            for t in threads:
                t.join(timeout=max(0.1, deadline - time.monotonic()))
