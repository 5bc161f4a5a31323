"""``airnode fetch``: find studies on a PACS (C-FIND) and pull them (C-MOVE or C-GET).

Query/Retrieve as SCU, Study Root information model (PS3.4 Annex C.6.2), at STUDY
level.  The retrieve brings the instances into the node by one of two paths:

* ``retrieve = "move"``: the PACS opens its own association to our receiver and sends
  each instance by C-STORE (PS3.4 C.4.2): the running receiver stores them with the
  usual acknowledgement contract.  The PACS must know our AE title, host and port.
* ``retrieve = "get"``: the PACS sends the instances back on this very association
  (PS3.4 C.4.3); we act as Storage SCP on it (SCP/SCU role selection, PS3.7 D.3.3.4)
  and store each one through the receiver's :class:`~node.receive.spool.Spool`, so a
  sub-operation succeeds only once its file and row are durable.

Either way the last C-MOVE/C-GET response counts the sub-operations.  A study whose
retrieve ended with status Success and no failed sub-operation is complete at once
(:func:`node.store.studies.mark_complete`, rule ``retrieve``): every one of its
instances was acknowledged by us, so the scheduler need not wait for a quiet period.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import func, select

from node.config import NodeConfig, SourceConfig
from node.dimse import client_tls_context
from node.errors import UserError
from node.logs import uid_tag
from node.receive import TRANSFER_SYNTAXES, Spool, Status, StoreOutcome
from node.store.db import CompleteRule, Database, Instance, open_db
from node.store.studies import mark_complete

__all__ = ["FetchError", "Query", "StudyFetched", "fetch", "parse_since"]

log = logging.getLogger(__name__)

#: PS3.7 D.3.2: at most 128 presentation contexts; Find and Get take two of them.
_MAX_STORAGE_CONTEXTS = 126
_PENDING = (0xFF00, 0xFF01)
_SINCE_RE = re.compile(r"^\s*(\d+)\s*([hdw])\s*$")
_UNITS = {"h": "hours", "d": "days", "w": "weeks"}


class FetchError(UserError):
    """Unknown source, PACS unreachable, query refused: a one-line message."""


@dataclass(frozen=True)
class Query:
    """What to look for; the keys are matched by the PACS (PS3.4 C.2.2.2)."""

    study_uid: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    since: str | None = None  # "2d", "12h", "1w": StudyDate from that day on

    def __post_init__(self) -> None:
        if not (self.study_uid or self.accession or self.patient_id):
            raise FetchError("name a study: --study UID, --accession NUMBER or --patient-id ID")
        if self.since is not None:
            parse_since(self.since)

    def identifier(self, today: datetime | None = None) -> Dataset:
        """The C-FIND identifier: the keys to match and the return keys we read."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = self.study_uid or ""
        ds.AccessionNumber = self.accession or ""
        ds.PatientID = self.patient_id or ""
        ds.ModalitiesInStudy = self.modality or ""
        ds.StudyDate = parse_since(self.since, today).strftime("%Y%m%d") + "-" if self.since else ""
        ds.StudyTime = ""
        ds.NumberOfStudyRelatedInstances = ""
        return ds


def parse_since(text: str, today: datetime | None = None) -> datetime:
    """``"2d"`` → the time two days ago (also ``h`` hours, ``w`` weeks), local time:
    Study Date is the date where the study was made (PS3.3 C.7.2.1)."""
    m = _SINCE_RE.match(text)
    if m is None:
        raise FetchError(f"--since {text!r}: write a number and h, d or w, e.g. 2d")
    delta = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    return (today or datetime.now().astimezone()) - delta


@dataclass(frozen=True)
class StudyFetched:
    """One study: what the PACS announced, what its retrieve reported."""

    study_uid: str
    found: int | None  # Number of Study Related Instances from C-FIND, when given
    retrieved: int  # completed sub-operations (warnings included: the data arrived)
    failed: int
    status: int  # the final C-MOVE/C-GET status
    complete: bool  # marked complete by rule "retrieve"
    reason: str = ""

    def line(self) -> str:
        found = "?" if self.found is None else str(self.found)
        state = "complete" if self.complete else f"not complete: {self.reason}"
        return (
            f"study {self.study_uid}: found {found}, retrieved {self.retrieved}, "
            f"failed {self.failed} ({state})"
        )


def _source(cfg: NodeConfig, name: str) -> SourceConfig:
    try:
        return cfg.source(name)
    except KeyError:
        known = ", ".join(s.name for s in cfg.sources) or "none configured in [[sources]]"
        raise FetchError(f"unknown source {name!r} (known: {known})") from None


def _describe(src: SourceConfig) -> str:
    return f"source {src.name} ({src.ae_title}@{src.host}:{src.port})"


def _status_text(status: int) -> str:
    names = {
        0xA700: "out of resources",
        0xA701: "out of resources: unable to calculate number of matches",
        0xA702: "out of resources: unable to perform sub-operations",
        0xA801: "move destination unknown",
        0xA900: "identifier does not match SOP class",
        0xB000: "sub-operations complete, one or more failures",
        0xFE00: "cancelled",
    }
    if status in names:
        return f"0x{status:04X} ({names[status]})"
    if 0xC000 <= status <= 0xCFFF:
        return f"0x{status:04X} (unable to process)"
    return f"0x{status:04X}"


def _store_status(outcome: StoreOutcome) -> Dataset:
    rsp = Dataset()
    rsp.Status = int(outcome.status)
    if outcome.comment and outcome.status != Status.SUCCESS:
        rsp.ErrorComment = outcome.comment[:64]  # LO
    return rsp


class _GetStore:
    """C-STORE sub-operations of a C-GET, stored with the receiver's contract."""

    def __init__(self, spool: Spool, src: SourceConfig) -> None:
        self.spool = spool
        self.src = src
        self.refused: list[str] = []  # why we refused sub-operations (for the report)

    def __call__(self, event: evt.Event) -> Dataset:
        try:
            req = cast(Any, event.request)
            outcome = self.spool.store(
                event.encoded_dataset(),
                command_sop_class_uid=str(req.AffectedSOPClassUID or ""),
                command_sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                calling_ae=self.src.ae_title,
                peer=self.src.host,
            )
        except Exception as exc:  # the status must say why; never pynetdicom's 0xC211
            log.exception("C-GET store failed: %s", type(exc).__name__)
            outcome = StoreOutcome(Status.OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
        if outcome.status != Status.SUCCESS:
            self.refused.append(f"0x{int(outcome.status):04X} {outcome.comment}".strip())
            log.info("C-GET sub-operation refused: %s", self.refused[-1])
        return _store_status(outcome)


@contextmanager
def _associate(
    cfg: NodeConfig, src: SourceConfig, store: _GetStore | None
) -> Iterator[Association]:
    ae = AE(ae_title=src.calling_ae_title or cfg.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = src.timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    handlers: list[Any] = []
    roles: list[Any] = []
    if src.retrieve == "move":
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    else:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for cx in StoragePresentationContexts[:_MAX_STORAGE_CONTEXTS]:
            sop_class = str(cx.abstract_syntax)
            ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
            roles.append(build_role(sop_class, scp_role=True))
        assert store is not None
        handlers.append((evt.EVT_C_STORE, store))
    tls_args = None
    if src.tls is not None:
        tls_args = (client_tls_context(src.tls.cert, src.tls.key, src.tls.ca), src.host)
    assoc = ae.associate(
        src.host,
        src.port,
        ae_title=src.ae_title,
        ext_neg=roles or None,
        evt_handlers=handlers or None,
        tls_args=tls_args,
    )
    if not assoc.is_established:
        rsp = assoc.acceptor.primitive
        if assoc.is_rejected:
            why = (
                f"association rejected ({getattr(rsp, 'reason_str', '?')}): check its AE "
                "title and that it knows ours"
            )
        elif rsp is not None and getattr(rsp, "result", None) == 0x00:
            how = "C-MOVE" if src.retrieve == "move" else "C-GET"
            why = f"accepts none of the proposed contexts (Study Root C-FIND and {how})"
        else:
            why = "unreachable (connection refused or timed out)"
        raise FetchError(f"{_describe(src)}: {why}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _find(assoc: Association, src: SourceConfig, query: Query) -> list[tuple[str, int | None]]:
    """C-FIND at STUDY level: (Study Instance UID, Number of Study Related Instances)."""
    found: dict[str, int | None] = {}
    for status, ident in assoc.send_c_find(
        query.identifier(), StudyRootQueryRetrieveInformationModelFind
    ):
        if not status:
            raise FetchError(f"{_describe(src)}: no answer to C-FIND (timeout or abort)")
        code = int(status.Status)
        if code in _PENDING:
            uid = str(getattr(ident, "StudyInstanceUID", "") or "")
            if uid:
                n = getattr(ident, "NumberOfStudyRelatedInstances", None)
                found[uid] = int(n) if n not in (None, "") else None
        elif code != 0x0000:
            raise FetchError(f"{_describe(src)}: C-FIND refused: {_status_text(code)}")
    return list(found.items())


def _retrieve(
    cfg: NodeConfig,
    db: Database,
    assoc: Association,
    src: SourceConfig,
    store: _GetStore | None,
    uid: str,
    n: int | None,
) -> StudyFetched:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = uid
    if src.retrieve == "move":
        dest = src.move_destination or cfg.node.ae_title
        responses = assoc.send_c_move(ident, dest, StudyRootQueryRetrieveInformationModelMove)
    else:
        responses = assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet)
    final: Dataset | None = None
    last: Dataset | None = None
    for status, _ in responses:
        if not status:
            break
        last = status
        if int(status.Status) not in _PENDING:
            final = status
    if final is None:
        partial = _counts(uid, n, last, -1, complete=False, reason="")
        reason = "no final response (timeout or abort)"
        return StudyFetched(uid, n, max(partial.retrieved, 0), partial.failed, -1, False, reason)
    code = int(final.Status)
    counted = _counts(uid, n, final, code, complete=False, reason="")
    if code == 0xA801:
        dest = src.move_destination or cfg.node.ae_title
        reason = f"{src.name} does not know move destination {dest}: add it with our host and port"
    elif code != 0x0000 or counted.failed:
        reason = f"retrieve ended with {_status_text(code)}"
        if store is not None and store.refused:
            reason += f"; refused here: {store.refused[0]}"
    else:
        with db.read() as s:
            here = s.scalar(
                select(func.count(Instance.id)).where(Instance.study_instance_uid == uid)
            )
        if not here:
            reason = "retrieve succeeded but no instance reached this node"
        elif mark_complete(db, uid, CompleteRule.RETRIEVE):
            retrieved = counted.retrieved if counted.retrieved >= 0 else int(here or 0)
            log.info("study %s retrieved from %s: complete", uid_tag(uid), src.name)
            return StudyFetched(uid, n, retrieved, 0, code, complete=True)
        else:
            reason = "study row missing"
    return StudyFetched(uid, n, max(counted.retrieved, 0), counted.failed, code, False, reason)


def _counts(
    uid: str, n: int | None, rsp: Dataset | None, code: int, *, complete: bool, reason: str
) -> StudyFetched:
    def num(keyword: str) -> int:
        value = getattr(rsp, keyword, None) if rsp is not None else None
        return int(value) if value not in (None, "") else 0

    has_done = rsp is not None and "NumberOfCompletedSuboperations" in rsp
    retrieved = (
        num("NumberOfCompletedSuboperations") + num("NumberOfWarningSuboperations")
        if has_done
        else -1
    )
    failed = num("NumberOfFailedSuboperations")
    return StudyFetched(uid, n, retrieved, failed, code, complete, reason)


def fetch(cfg: NodeConfig, source: str, query: Query) -> list[StudyFetched]:
    """Find the studies ``query`` matches on ``source`` and retrieve each of them."""
    src = _source(cfg, source)
    db = open_db(cfg.node.resolved_database_url)
    try:
        store = None
        if src.retrieve == "get":
            sec = cfg.security
            spool = Spool(
                cfg.node.spool_dir,
                db,
                min_free_bytes=sec.min_free_bytes,
                max_instance_bytes=sec.max_instance_bytes,
            )
            store = _GetStore(spool, src)
        with _associate(cfg, src, store) as assoc:
            studies = _find(assoc, src, query)
            if not studies:
                raise FetchError(f"{_describe(src)}: no study matches the query")
            t0 = time.monotonic()
            out: list[StudyFetched] = []
            for uid, n in studies:
                if not assoc.is_established:  # the PACS aborted during an earlier retrieve
                    out.append(StudyFetched(uid, n, 0, 0, -1, False, "association lost"))
                    continue
                if store is not None:
                    store.refused.clear()
                out.append(_retrieve(cfg, db, assoc, src, store, uid, n))
            log.info("retrieved %d stud(ies) in %.1f s", len(out), time.monotonic() - t0)
            return out
    finally:
        db.dispose()
