"""Typed job payloads: what each kind of job carries, validated when it is read.

A job's ``payload`` column is JSON; the stages never read it with ``.get(...)`` but
through the model of its kind (:class:`InferPayload`, :class:`SendPayload`), so a
missing or mistyped key is found where the job is read, named in one line, and ends
the job ``dead`` (:class:`~node.store.jobs.PermanentJobError`) instead of surfacing
as a ``None`` further down.  Unknown keys (from a newer airnode) are ignored.

The destination and the result object's SOP Instance UID of a send job are also
columns of ``jobs`` (``destination``, ``result_sop_instance_uid``), which claiming and
clean-up query; :func:`node.store.jobs.enqueue` fills them from the payload.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from node.store.db import Job, JobKind

__all__ = ["InferPayload", "JobPayload", "PayloadError", "SendPayload"]

_UID = Field(min_length=1, max_length=64)


class PayloadError(ValueError):
    """A job's payload does not fit its kind (one line naming the key)."""


P = TypeVar("P", bound="JobPayload")


class JobPayload(BaseModel):
    """Base of the payload of one job kind."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    kind: ClassVar[JobKind]

    @classmethod
    def of(cls: type[P], job: Job) -> P:
        """The validated payload of ``job``; :class:`PayloadError` when it does not fit."""
        if job.kind != cls.kind:
            raise PayloadError(f"job {job.id} is a {job.kind} job, not {cls.kind}")
        try:
            return cls.model_validate(job.payload)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            raise PayloadError(f"job {job.id}: payload.{loc}: {err['msg']}") from None

    def dump(self) -> dict[str, object]:
        """The JSON-ready mapping stored in ``jobs.payload``."""
        return self.model_dump(mode="json", exclude_none=True)


class InferPayload(JobPayload):
    """An ``infer`` job: run ``model`` ``model_version`` on these instances.

    ``timings`` and ``result_sop_instance_uids`` are added when the job is done.
    """

    kind: ClassVar[JobKind] = JobKind.INFER

    model: str = Field(min_length=1)
    model_version: str = Field(min_length=1)
    study_instance_uid: str = _UID
    series_instance_uids: list[str] = Field(default_factory=list)
    sop_instance_uids: list[str] = Field(min_length=1)
    destinations: list[str] = Field(default_factory=list)
    route: str | None = None
    routes: list[str] = Field(default_factory=list)
    timings: dict[str, float] | None = None
    result_sop_instance_uids: list[str] | None = None
    #: Instances left out because they cannot be read (UID tag → reason), when any.
    unreadable: dict[str, str] | None = None
    #: Series the model's input guards refused: ``{"series_instance_uid", "reasons"}``.
    not_analysed: list[dict[str, Any]] | None = None


class SendPayload(JobPayload):
    """A ``send`` job: deliver the outbox file ``path`` (result ``result_id``) there."""

    kind: ClassVar[JobKind] = JobKind.SEND

    result_id: int
    sop_instance_uid: str = _UID
    path: str = Field(min_length=1)
    destination: str = Field(min_length=1, max_length=64)
