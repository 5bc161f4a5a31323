"""Logging for every stage: plain or JSON lines, and no PHI by default.

Code logs UIDs and counts, never patient attributes; as a second line of defence a
filter masks anything that looks like a DICOM person name (``A^B``), and UIDs are
shortened to a stable hash (:func:`uid_tag`) unless ``log_phi`` is set, so a log
can be shared with a vendor without leaking who was scanned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import Any

__all__ = ["configure_logging", "uid_tag"]

# A DICOM person name: components joined by carets (PS3.5 §6.2, PN).
_PN_RE = re.compile(r"[\w.\-']+(?:\^[\w.\-']*)+")
# Five or more components: a UID, never a dotted IPv4 address (which has four).
_UID_RE = re.compile(r"\b\d+(?:\.\d+){4,}\b")

_show_phi = False


def uid_tag(uid: str | None) -> str:
    """A short, stable stand-in for a UID in logs (the full UID only when PHI is allowed)."""
    if not uid:
        return "-"
    if _show_phi:
        return uid
    return "uid:" + hashlib.sha256(uid.encode()).hexdigest()[:10]


class PhiFilter(logging.Filter):
    """Masks person names and UIDs in the rendered message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _show_phi:
            return True
        msg = record.getMessage()
        masked = _PN_RE.sub("<name>", msg)
        masked = _UID_RE.sub(lambda m: uid_tag(m.group(0)), masked)
        if masked != msg:
            record.msg = masked
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "stage": os.environ.get("AIRNODE_STAGE", ""),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(
    level: str = "INFO", *, json_lines: bool = False, show_phi: bool = False, stage: str = ""
) -> None:
    """Set up the root logger for this process (call once, at the stage's start)."""
    global _show_phi
    _show_phi = show_phi
    if stage:
        os.environ["AIRNODE_STAGE"] = stage
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(PhiFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"[{stage}] " if stage else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # Alembic announces its plugins and dialect at INFO in every stage at start-up.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # pynetdicom logs whole data sets (patient names included) at DEBUG.
    logging.getLogger("pynetdicom").setLevel(max(logging.INFO, logging.getLevelName(level)))
