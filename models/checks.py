"""Argument checks written once: constructors raise early, naming the bad argument."""

from __future__ import annotations

__all__ = ["at_least"]


def at_least(minimum: float, **values: float | None) -> None:
    """Raise ``ValueError("NAME must be >= MINIMUM, got VALUE")`` for the first value
    below ``minimum``; ``None`` (an optional argument not given) passes."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
