"""Deterministic UIDs for result objects.

A result's UIDs are a pure function of the source study and series, the model name
and version, the object kind, an index and, for object instances, the exact input: a
digest of the sorted source SOP Instance UIDs (the same digest the infer job's
idempotency key holds). A worker that crashed and re-ran the same infer job therefore
produces the same identities, and a resend after a crash is a duplicate the PACS
ignores (PS3.4 B.4.1: a repeated SOP Instance UID). A re-run on changed input (slices
that arrived late) produces new instances in the same result series, so the
corrected objects are stored next to the earlier ones instead of being discarded as
duplicates.

By default the UIDs use the ``2.25`` root (PS3.5 Annex B.2: a UUID written as one
integer) with a name-based UUID (RFC 4122 version 5) of the inputs; that root needs no
registered organisation. A site with its own root sets :data:`UID_PREFIX` (the one
place it is chosen) and gets ``<root>.<hash digits>`` from
:func:`pydicom.uid.generate_uid`. (``generate_uid(prefix=None)`` ignores its entropy
sources and is random, so it is not used for the default.)
"""

from __future__ import annotations

import uuid

from pydicom.uid import generate_uid

__all__ = ["UID_PREFIX", "result_uid"]

#: The one place the UID root is chosen. ``None`` means the ``2.25.`` UUID-derived form;
#: otherwise a root ending in ".", at most 30 characters long.
UID_PREFIX: str | None = None

_NAMESPACE = uuid.UUID("6f1c1a52-6d2b-5a0e-9c55-2f1e4b7d8a31")


def result_uid(
    study_instance_uid: str,
    series_instance_uid: str,
    model_name: str,
    model_version: str,
    kind: str,
    index: int = 0,
    input_digest: str = "",
) -> str:
    """A UID that is the same every time for the same inputs, and unique across them.

    ``input_digest`` is empty for identities that stay across versions of a result (its
    series, tracking UIDs) and the input digest for the object instances.
    """
    for name, value in (
        ("study_instance_uid", study_instance_uid),
        ("model_name", model_name),
        ("model_version", model_version),
        ("kind", kind),
    ):
        if not value:
            raise ValueError(f"result_uid: {name} must not be empty")
    if index < 0:
        raise ValueError(f"result_uid: index must be >= 0, got {index}")
    sources = [
        "airnode-result-v1",
        study_instance_uid,
        series_instance_uid,
        model_name,
        model_version,
        kind,
        str(index),
    ]
    if input_digest:
        sources.append(input_digest)
    if UID_PREFIX is None:
        return f"2.25.{uuid.uuid5(_NAMESPACE, chr(0).join(sources)).int}"
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=sources))
