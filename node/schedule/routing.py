"""Routing rules: which models run on a series, and where their results go.

A rule (:class:`node.config.RouteConfig`) maps attribute names to conditions; every
condition must hold (AND) and several rules may fire for one series.  An OR is written
either as several accepted values for one key or as several rules naming the same model.

Attribute names are DICOM keywords (PS3.6 Section 6, e.g. ``Modality``,
``BodyPartExamined``, ``PhotometricInterpretation``, ``Rows``) read from the header of
one instance of the series, plus derived keys:

``CallingAETitle``
    The AE title of the sender (PS3.8 Section 9.3.2), from the ``instances`` row.
``ImageSize``
    ``"ROWSxCOLUMNS"``, e.g. ``"2048x2048"``, so that a rule can select on the image
    itself: series descriptions are free text typed by technologists and unreliable.
``SOPClassName``
    The name of the SOP Class (PS3.4 Annex B.5), e.g. ``"CT Image Storage"``.

A condition is either a list of accepted values (a bare value is a list of one) or a
string ``"re:PATTERN"``, a regular expression searched case-insensitively.  Values
compare as numbers when the accepted value is a number (``Rows = [512]`` matches an
IS/US of 512 and a DS of ``"512.0"``), otherwise as text after stripping the DICOM
padding, case-insensitively.  For a multi-valued attribute (VM > 1, e.g.
``ImageType``) a condition holds when it holds for any one value; a regular expression
is also tried on the whole value as stored, joined by backslashes
(``"re:^ORIGINAL\\\\PRIMARY"``).  A missing or empty attribute fails every condition
except an accepted value of ``""`` (which then means "absent or empty").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from node.config import MatchValue, RouteConfig

__all__ = [
    "DERIVED_KEYS",
    "AttrValue",
    "RouteMatch",
    "Router",
    "RoutingError",
    "evaluate_dataset",
    "read_header",
]

#: Keys computed by the node rather than read from a DICOM keyword.
DERIVED_KEYS = frozenset({"CallingAETitle", "ImageSize", "SOPClassName"})

#: A normalised attribute: ``None`` when absent or empty, else its values as text.
AttrValue = tuple[str, ...] | None

_UNMATCHABLE_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})


class RoutingError(ValueError):
    """A routing rule cannot be evaluated (unknown keyword, binary attribute...)."""


@dataclass(frozen=True)
class RouteMatch:
    """One rule that fired: run ``model`` and send its results to ``destinations``.

    ``model_version`` is the route's pin, ``None`` for "the highest installed".
    """

    route: str
    model: str
    destinations: tuple[str, ...]
    model_version: str | None = None


@dataclass(frozen=True)
class _Condition:
    key: str
    pattern: re.Pattern[str] | None
    values: tuple[str | int | float, ...]

    def holds(self, attr: AttrValue) -> bool:
        if attr is None:
            return self.pattern is None and any(v == "" for v in self.values)
        if self.pattern is not None:
            candidates = (*attr, "\\".join(attr)) if len(attr) > 1 else attr
            return any(self.pattern.search(a) for a in candidates)
        return any(_equal(a, v) for a in attr for v in self.values)

    def describe(self) -> str:
        if self.pattern is not None:
            return f"{self.key} ~ /{self.pattern.pattern}/i"
        return f"{self.key} in {list(self.values)!r}"


def _equal(attr: str, accepted: str | int | float) -> bool:
    if isinstance(accepted, bool):  # TOML true/false: compare as text ("true")
        return attr.casefold() == str(accepted).casefold()
    if isinstance(accepted, int | float):
        try:
            return float(attr) == float(accepted)
        except ValueError:
            return False
    return attr.casefold() == accepted.strip().casefold()


def _check_key(key: str, where: str) -> None:
    if key in DERIVED_KEYS:
        return
    tag = tag_for_keyword(key)
    if tag is None:
        raise RoutingError(
            f"{where}: unknown attribute {key!r} (use a DICOM keyword such as 'Modality', "
            f"or one of {', '.join(sorted(DERIVED_KEYS))})"
        )
    vr = dictionary_VR(tag)
    if any(v.strip() in _UNMATCHABLE_VRS for v in vr.split(" or ")):  # e.g. "OB or OW"
        raise RoutingError(f"{where}: attribute {key!r} has VR {vr} and cannot be matched")


def _condition(key: str, cond: MatchValue, where: str) -> _Condition:
    _check_key(key, where)
    if isinstance(cond, str) and cond.startswith("re:"):
        try:
            return _Condition(key, re.compile(cond[3:], re.IGNORECASE), ())
        except re.error as exc:
            raise RoutingError(f"{where}: bad regular expression for {key}: {exc}") from None
    values = tuple(cond) if isinstance(cond, list) else (cond,)
    if not values:
        raise RoutingError(f"{where}: {key} has an empty list of accepted values")
    return _Condition(key, None, values)


def _normalise(value: Any) -> AttrValue:
    """DICOM value → tuple of stripped strings; ``None`` when absent or empty."""
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        items = [_text(v) for v in value]
        items = [i for i in items if i != ""]
        return tuple(items) or None
    text = _text(value)
    return (text,) if text != "" else None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \0")
    return str(value).strip(" \0")


def read_header(path: Path | str) -> Dataset:
    """One instance's header, without its pixel data (cheap even for a 2 GB instance)."""
    return dcmread(path, stop_before_pixels=True)


class Router:
    """The compiled routing rules of one configuration.

    Constructing a router checks every rule (keywords exist in the DICOM data
    dictionary, are not sequences or binary, patterns compile), so that a mistake
    stops the scheduler at start-up instead of silently matching nothing.
    """

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        compiled: list[tuple[RouteConfig, tuple[_Condition, ...]]] = []
        for i, route in enumerate(routes):
            if not isinstance(route, RouteConfig):
                raise TypeError(f"routes[{i}] must be a RouteConfig, not {type(route).__name__}")
            where = f"routes[{i}] ({route.name}).match"
            conds = tuple(_condition(k, v, where) for k, v in route.match.items())
            compiled.append((route, conds))
        self._routes = tuple(compiled)
        self.keys: frozenset[str] = frozenset(c.key for _, conds in self._routes for c in conds)

    @property
    def routes(self) -> tuple[RouteConfig, ...]:
        return tuple(r for r, _ in self._routes)

    def attributes(
        self,
        ds: Dataset | None,
        *,
        calling_ae: str | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> dict[str, AttrValue]:
        """The normalised values of the keys the rules use.

        ``defaults`` (e.g. ``Modality`` and ``SOPClassUID`` from the ``instances``
        row) fill in what the header lacks, or everything when ``ds`` is ``None``
        because no file of the series could be read.
        """
        out: dict[str, AttrValue] = {}
        for key in self.keys | {"Modality", "SOPClassUID"}:
            value: Any = None
            if key == "CallingAETitle":
                value = calling_ae
            elif key == "ImageSize":
                rows = ds.get("Rows") if ds is not None else None
                cols = ds.get("Columns") if ds is not None else None
                if rows is not None and cols is not None:
                    value = f"{int(rows)}x{int(cols)}"
            elif key == "SOPClassName":
                uid = (ds.get("SOPClassUID") if ds is not None else None) or (defaults or {}).get(
                    "SOPClassUID"
                )
                value = UID(str(uid)).name if uid else None
            elif ds is not None and key in ds:
                value = ds[key].value
            if _normalise(value) is None and defaults is not None:
                value = defaults.get(key)
            out[key] = _normalise(value)
        return out

    def evaluate(self, attrs: Mapping[str, AttrValue]) -> list[RouteMatch]:
        """Every rule whose conditions all hold, in configuration order."""
        fired: list[RouteMatch] = []
        for route, conds in self._routes:
            if all(c.holds(attrs.get(c.key)) for c in conds):
                fired.append(
                    RouteMatch(route.name, route.model, tuple(route.send_to), route.model_version)
                )
        return fired

    def explain(self, attrs: Mapping[str, AttrValue]) -> dict[str, str | None]:
        """For each rule, the first condition that failed (``None`` when it fired)."""
        out: dict[str, str | None] = {}
        for route, conds in self._routes:
            failed = next((c for c in conds if not c.holds(attrs.get(c.key))), None)
            out[route.name] = None if failed is None else failed.describe()
        return out

    def models(self) -> list[str]:
        """Model names the rules refer to, each once, in configuration order."""
        return list(dict.fromkeys(r.model for r, _ in self._routes))


def evaluate_dataset(
    routes: Iterable[RouteConfig], ds: Dataset, calling_ae: str | None = None
) -> list[RouteMatch]:
    """Convenience: compile ``routes`` and evaluate them on one header."""
    router = Router(list(routes))
    return router.evaluate(router.attributes(ds, calling_ae=calling_ae))
