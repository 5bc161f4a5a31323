"""Modality Performed Procedure Step SCP (PS3.4 Annex F.7): the scanner says when it is done.

A modality creates an MPPS with N-CREATE when it starts acquiring (status ``IN
PROGRESS``) and finishes it with N-SET (``COMPLETED`` or ``DISCONTINUED``), listing in
the Performed Series Sequence (0040,0340) every instance it made: Referenced Image
Sequence (0008,1140) and Referenced Non-Image Composite SOP Instance Sequence
(0040,0220).  This module only records the step in the ``mpps`` table, committed
before the response; the scheduler decides that a study is complete once all its
steps are finished and every listed instance has arrived.

Statuses (PS3.4 F.7.2.1.2 and F.7.2.2.2, PS3.7 Annex C): 0x0000 success, 0x0111
duplicate SOP instance, 0x0112 no such SOP instance, 0x0120 missing attribute, 0x0106
invalid attribute value, 0xC310 the step may no longer be updated, 0x0110 processing
failure (the table could not be written).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from node.logs import uid_tag
from node.receive.headers import check_uid
from node.store.db import AuditEvent, Database, Mpps, now

__all__ = ["MppsScp", "mpps_context"]

log = logging.getLogger(__name__)

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
_STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)

SUCCESS = 0x0000
INVALID_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_INSTANCE = 0x0111
NO_SUCH_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120
NO_LONGER_UPDATABLE = 0xC310


def mpps_context() -> PresentationContext:
    """The MPPS SOP Class with the two uncompressed transfer syntaxes every SCU offers."""
    cx = PresentationContext()
    cx.abstract_syntax = ModalityPerformedProcedureStep
    cx.transfer_syntax = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    return cx


def referenced_instances(ds: Dataset) -> list[str] | None:
    """SOP Instance UIDs listed in the Performed Series Sequence; ``None`` if absent."""
    if "PerformedSeriesSequence" not in ds:
        return None
    out: list[str] = []
    for series in ds.PerformedSeriesSequence:
        for key in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for item in getattr(series, key, None) or []:
                uid = str(getattr(item, "ReferencedSOPInstanceUID", "") or "")
                if uid:
                    out.append(uid)
    return out


def _study_uid(ds: Dataset) -> str | None:
    for item in getattr(ds, "ScheduledStepAttributesSequence", None) or []:
        uid = str(getattr(item, "StudyInstanceUID", "") or "")
        if uid:
            return uid
    return None


def _audit(name: str, ae: str, peer: str, uid: str, status: str, t: float) -> AuditEvent:
    """Who reported which step (UIDs only, no PHI), as for received instances."""
    return AuditEvent(at=t, event=name, ae_title=ae, peer=peer, sop_instance_uid=uid, detail=status)


class MppsScp:
    """The N-CREATE and N-SET handlers of one receiver process."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def handlers(self) -> list[tuple[evt.EventType, Callable[[evt.Event], Any]]]:
        return [(evt.EVT_N_CREATE, self.on_create), (evt.EVT_N_SET, self.on_set)]

    def on_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """N-CREATE (PS3.4 F.7.2.1): a new step, normally ``IN PROGRESS``."""
        try:
            req = cast(Any, event.request)
            if str(req.AffectedSOPClassUID) != ModalityPerformedProcedureStep:
                return PROCESSING_FAILURE, None
            ds = event.attribute_list
            uid = str(req.AffectedSOPInstanceUID or "") or generate_uid()
            if check_uid(uid):
                return INVALID_VALUE, None
            status = str(getattr(ds, "PerformedProcedureStepStatus", "") or "").strip()
            if not status:
                return MISSING_ATTRIBUTE, None
            if status not in _STATUSES:
                return INVALID_VALUE, None
            study = _study_uid(ds)
            if study is not None and check_uid(study):
                return INVALID_VALUE, None
            calling = str(event.assoc.requestor.ae_title).strip()[:16]
            peer = str(event.assoc.requestor.address)[:128]
            t = now()
            with self.db.session() as s:
                if s.scalar(select(Mpps.id).where(Mpps.sop_instance_uid == uid)) is not None:
                    return DUPLICATE_INSTANCE, None
                s.add(
                    Mpps(
                        sop_instance_uid=uid,
                        study_instance_uid=study,
                        status=status,
                        referenced=referenced_instances(ds) or [],
                        calling_ae=calling,
                        created_at=t,
                        updated_at=t,
                    )
                )
                s.add(_audit("mpps-created", calling, peer, uid, status, t))
        except SQLAlchemyError as exc:
            log.error("MPPS N-CREATE not recorded: %s", type(exc).__name__)
            return PROCESSING_FAILURE, None
        except Exception as exc:  # any failure gets a specific status, never 0xC211
            log.exception("MPPS N-CREATE failed: %s", type(exc).__name__)
            return PROCESSING_FAILURE, None
        log.info("MPPS %s created (%s) for study %s", uid_tag(uid), status, uid_tag(study))
        rsp = Dataset()
        rsp.AffectedSOPInstanceUID = uid  # echoed when we assigned it
        return SUCCESS, rsp

    def on_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """N-SET (PS3.4 F.7.2.2): new status and/or performed series of a step."""
        try:
            req = cast(Any, event.request)
            uid = str(req.RequestedSOPInstanceUID or "")
            mods = event.modification_list
            status = str(getattr(mods, "PerformedProcedureStepStatus", "") or "").strip()
            if status and status not in _STATUSES:
                return INVALID_VALUE, None
            listed = referenced_instances(mods)
            calling = str(event.assoc.requestor.ae_title).strip()[:16]
            peer = str(event.assoc.requestor.address)[:128]
            with self.db.session() as s:
                row = s.scalar(select(Mpps).where(Mpps.sop_instance_uid == uid))
                if row is None:
                    return NO_SUCH_INSTANCE, None
                if row.status != IN_PROGRESS:
                    return NO_LONGER_UPDATABLE, None
                if status:
                    row.status = status
                if listed is not None:
                    row.referenced = listed
                row.updated_at = now()
                final, n = row.status, len(row.referenced)
                s.add(_audit("mpps-set", calling, peer, uid, final, row.updated_at))
        except SQLAlchemyError as exc:
            log.error("MPPS N-SET not recorded: %s", type(exc).__name__)
            return PROCESSING_FAILURE, None
        except Exception as exc:
            log.exception("MPPS N-SET failed: %s", type(exc).__name__)
            return PROCESSING_FAILURE, None
        log.info("MPPS %s set to %s, %d instance(s) listed", uid_tag(uid), final, n)
        return SUCCESS, Dataset()
