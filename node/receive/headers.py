"""Header checks of a received instance: its identifying UIDs, read without pixels.

The C-STORE handler needs four UIDs and the modality to file an instance and to check
it against the command (PS3.4 Annex B.2.3); nothing else of the data set is decoded.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom

__all__ = ["HeaderInfo", "ParseError", "check_uid", "parse_header"]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@dataclass(frozen=True)
class HeaderInfo:
    """The few attributes the node needs from a data set header (no PHI)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    #: Number of Study Related Instances (0020,1208) when the sender states it.
    study_related_instances: int | None = None


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


def _count(value: object) -> int | None:
    """A positive IS value, else ``None`` (absent, empty, malformed, zero)."""
    try:
        n = int(str(value).strip()) if value not in (None, "") else 0
    except ValueError:
        return None
    return n if n > 0 else None


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
                study_related_instances=_count(ds.get("NumberOfStudyRelatedInstances")),
            )
    except ParseError:
        raise
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise ParseError(f"cannot parse data set: {type(exc).__name__}") from None
    if not info.sop_class_uid and not info.sop_instance_uid:
        raise ParseError("data set has neither SOP Class UID nor SOP Instance UID")
    return info
