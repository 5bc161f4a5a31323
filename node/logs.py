"""Logging for every stage: plain or JSON lines, and no PHI by default.

Code logs UIDs and counts, never patient attributes; as a second line of defence a
filter masks anything that looks like a DICOM person name (``A^B``), and UIDs are
shortened to a stable hash (:func:`uid_tag`) unless ``log_phi`` is set, so a log
can be shared with a vendor without leaking who was scanned.  :func:`mask_phi` is
the one masking function: the log filter and the status page both call it.

Masking runs on text a peer controls (pynetdicom logs a bad UID of an
A-ASSOCIATE-RQ before any policy check), so both patterns are linear in the length
of the text: a match may only start where a run of name or UID characters starts
(a look-behind), never at every position inside a 60,000-character run.  Long
messages are cut to :data:`MAX_MESSAGE_CHARS` after masking.
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

__all__ = ["MAX_MESSAGE_CHARS", "configure_logging", "mask_phi", "uid_tag"]

#: A logged message is cut to this length (after masking).
MAX_MESSAGE_CHARS = 4096

_NAME_CHARS = r"\w.\-'"
# A DICOM person name: components joined by carets (PS3.5 §6.2, PN).  The
# look-behind lets a match start only at the first character of a run, which keeps
# the search linear (without it, a long run with no caret is rescanned from each of
# its characters: quadratic).
_PN_RE = re.compile(rf"(?<![{_NAME_CHARS}^])[{_NAME_CHARS}]+(?:\^[{_NAME_CHARS}]*)+")
# Three or more dotted numeric components; :func:`_uid_or_not` keeps IPv4 addresses
# and short version numbers.  Same look-behind: starts only where a run starts.
_DOTTED_RE = re.compile(r"(?<![\d.])\d+(?:\.\d+){2,}")

_show_phi = False


def uid_tag(uid: str | None) -> str:
    """A short, stable stand-in for a UID in logs (the full UID only when PHI is allowed)."""
    if not uid:
        return "-"
    if _show_phi:
        return uid
    return "uid:" + hashlib.sha256(uid.encode()).hexdigest()[:10]


def _uid_or_not(m: re.Match[str]) -> str:
    text = m.group(0)
    parts = text.split(".")
    if len(parts) == 4 and all(len(p) <= 3 and int(p) <= 255 for p in parts):
        return text  # an IPv4 address
    if len(parts) < 5 and len(text) < 10:
        return text  # a version number such as 3.0.4
    return uid_tag(text)


def mask_phi(text: str) -> str:
    """``text`` with person names replaced by ``<name>`` and UIDs by :func:`uid_tag`.

    Every UID form is masked (PS3.5 §9.1): five or more components, and shorter
    ones such as ``2.25.<39 digits>`` (ISO/IEC 9834-8 UUID-derived UIDs).
    """
    masked = _PN_RE.sub("<name>", text)
    return _DOTTED_RE.sub(_uid_or_not, masked)


class PhiFilter(logging.Filter):
    """Masks person names and UIDs in the rendered message, then cuts it to length."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        masked = msg if _show_phi else mask_phi(msg)
        if len(masked) > MAX_MESSAGE_CHARS:
            masked = f"{masked[:MAX_MESSAGE_CHARS]}… ({len(masked)} characters)"
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
    # Library warnings (highdicom, pydicom) quote attribute values, names included:
    # through logging, so that they are masked like everything else.
    logging.captureWarnings(True)
    # Alembic announces its plugins and dialect at INFO in every stage at start-up.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # pynetdicom logs whole data sets (patient names included) at DEBUG.
    logging.getLogger("pynetdicom").setLevel(max(logging.INFO, logging.getLevelName(level)))
