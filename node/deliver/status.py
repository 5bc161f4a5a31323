"""How a C-STORE outcome maps onto the job life cycle (PS3.4 Annex B.2.3, PS3.7 Annex C).

* ``0x0000`` success and ``0xB0xx`` warnings (coercion, elements discarded) → done.
* ``0xA7xx`` out of resources → transient: retry with back-off.
* ``0xA9xx`` data set does not match SOP class, ``0xCxxx`` cannot understand,
  ``0x0122`` SOP class not supported → permanent: dead with the reason.
* Any other failure code (e.g. ``0x0110`` processing failure) → transient; the retry
  budget bounds it.
* No response (association aborted, DIMSE timeout) → transient.
"""

from __future__ import annotations

import enum

__all__ = ["Outcome", "classify", "describe"]


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


_NAMES = {
    0x0000: "success",
    0x0110: "processing failure",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0211: "unrecognised operation",
}


def classify(status: int | None) -> Outcome:
    """The job outcome for a C-STORE response status (``None``: no response)."""
    if status is None:
        return Outcome.TRANSIENT
    if status == 0x0000 or 0xB000 <= status <= 0xB0FF:
        return Outcome.SUCCESS
    if 0xA700 <= status <= 0xA7FF:
        return Outcome.TRANSIENT
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF:
        return Outcome.PERMANENT
    if status in (0x0122, 0x0117, 0x0124):
        return Outcome.PERMANENT
    return Outcome.TRANSIENT


def describe(status: int | None) -> str:
    """A readable one-line name for a status, e.g. ``0xA700 (out of resources)``."""
    if status is None:
        return "no response (association aborted or timed out)"
    if 0xA700 <= status <= 0xA7FF:
        name = "out of resources"
    elif 0xA900 <= status <= 0xA9FF:
        name = "data set does not match SOP class"
    elif 0xC000 <= status <= 0xCFFF:
        name = "cannot understand"
    elif 0xB000 <= status <= 0xB0FF:
        name = "warning"
    else:
        name = _NAMES.get(status, "failure")
    return f"0x{status:04X} ({name})"
