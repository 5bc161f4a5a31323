"""Reading numbers out of DICOM elements (shared by the grey-level and geometry steps)."""

from __future__ import annotations

from pydicom.multival import MultiValue


def first_float(value: object) -> float | None:
    """First value of a possibly multi-valued DS/IS element, as float (None if absent)."""
    if value is None or (isinstance(value, (str, bytes)) and not value):
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if not value:
            return None
        value = value[0]
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
