"""Job priorities from the routes and from the study's own headers.

A route sets the priority of the jobs it creates (``priority = "stat"`` …, default
``routine``; :data:`node.config.PRIORITY_LEVELS`).  A header attribute can raise it:
``[priority.attributes]`` maps a DICOM keyword to {value → priority}, by default
Requested Procedure Priority (0040,1003; PS3.3 Section C.4.11), whose defined terms are
STAT, HIGH, ROUTINE, MEDIUM and LOW.  The scheduler asks :meth:`HeaderPriority.of`
with the one header it already reads per series; a job runs at the highest of its
routes' priority and the values found in its input series.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset

from node.config import PriorityConfig, RouteConfig, priority_value

__all__ = ["HeaderPriority", "route_priority"]


def route_priority(routes: Iterable[RouteConfig]) -> int:
    """The highest priority among the routes that fired for one job."""
    return max(priority_value(r.priority) for r in routes)


class HeaderPriority:
    """The compiled ``[priority]`` section: header value → priority number."""

    def __init__(self, cfg: PriorityConfig) -> None:
        self._map = {
            key: {str(v).strip().casefold(): priority_value(p) for v, p in values.items()}
            for key, values in cfg.attributes.items()
        }

    def of(self, ds: Dataset | None) -> int | None:
        """The highest priority the mapped attributes of ``ds`` give; ``None`` if none."""
        if ds is None:
            return None
        found: list[int] = []
        for key, values in self._map.items():
            value = ds.get(key)
            if value is None:
                continue
            text = str(value.value if hasattr(value, "value") else value).strip(" \0").casefold()
            if text in values:
                found.append(values[text])
        return max(found, default=None)
