"""Where a finding is, in the image coordinates SR and presentation states use.

DICOM 2D coordinates (SCOORD, GSPS graphic data; PS3.3 C.18.6.1.1 and C.10.5.1.2) are
(column, row) with the top-left corner of the top-left pixel at (0, 0), so the centre
of pixel (r, c) is (c + 0.5, r + 0.5). The lesion outline here follows pixel edges: it
encloses exactly the mask's pixels, so its area is the pixel count times the pixel
area, and a viewer draws it around the lesion, not through its border pixels.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from models.result import Finding, InferenceResult

__all__ = ["HOT_FRACTION", "Placement", "key_slice", "outline", "place", "polygon_area"]

#: The hot region of a heatmap: where it reaches this fraction of its peak.
HOT_FRACTION = 0.5


@dataclass(frozen=True)
class Placement:
    """Where one finding is drawn: its image, its peak and (when known) its outline.

    ``outline`` is a closed (column, row) polygon: the lesion on its key slice for a
    segmentation, the hot region around the peak for a heatmap.
    """

    sop_instance_uid: str
    peak: tuple[float, float]
    outline: npt.NDArray[np.float64] | None


def place(result: InferenceResult, finding: Finding) -> Placement | None:
    """The :class:`Placement` of ``finding``; ``None`` when it has no location."""
    label = finding.segment_number
    if result.mask is not None and label is not None:
        k = key_slice(result.mask, label)
        if k is not None:
            region = result.mask[k] == label
            rows, cols = np.nonzero(region)
            # The lesion pixel nearest its centroid: inside the lesion even when concave.
            d = (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2
            i = int(np.argmin(d))
            return Placement(
                result.source_sop_instance_uids[k],
                (float(cols[i]) + 0.5, float(rows[i]) + 0.5),
                outline(region),
            )
    if finding.peak is None:
        return None
    uid, row, col = finding.peak
    heat = result.heatmaps.get(uid)
    shape = None
    if heat is not None and heat.shape[0] > row and heat.shape[1] > col and heat[row, col] > 0:
        hot = heat >= HOT_FRACTION * float(heat[row, col])
        shape = outline(_component(hot, row, col))
    return Placement(uid, (col + 0.5, row + 0.5), shape)


def _component(mask: npt.NDArray[np.bool_], row: int, col: int) -> npt.NDArray[np.bool_]:
    """The 4-connected part of ``mask`` that holds (row, col).

    Walks runs of set pixels row by row (two runs in neighbouring rows touch when
    their column ranges overlap), so a heatmap region of a million pixels costs a few
    thousand steps, not a million.
    """
    out = np.zeros_like(mask, dtype=bool)
    if not mask[row, col]:
        return out
    edges = np.diff(np.pad(np.asarray(mask, dtype=np.int8), ((0, 0), (1, 1))), axis=1)
    starts_r, starts_c = np.nonzero(edges == 1)
    _, ends_c = np.nonzero(edges == -1)  # exclusive ends, same order as the starts
    runs: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r, a, b in zip(starts_r.tolist(), starts_c.tolist(), ends_c.tolist(), strict=True):
        runs[r].append((a, b))
    first = next((a, b) for a, b in runs[row] if a <= col < b)
    seen = {(row, first[0])}
    stack = [(row, first[0], first[1])]
    while stack:
        r, a, b = stack.pop()
        out[r, a:b] = True
        for nr in (r - 1, r + 1):
            for a2, b2 in runs.get(nr, ()):
                if a2 < b and b2 > a and (nr, a2) not in seen:
                    seen.add((nr, a2))
                    stack.append((nr, a2, b2))
    return out


_Point = tuple[int, int]


def key_slice(mask: npt.NDArray[np.uint8], label: int) -> int | None:
    """The index of the image where segment ``label`` has the most pixels (None if absent)."""
    areas = (mask == label).reshape(mask.shape[0], -1).sum(axis=1)
    if not areas.any():
        return None
    return int(np.argmax(areas))


def outline(region: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """The closed outer boundary of the largest region in ``region`` as (column, row) points.

    Boundary edges between pixels inside and outside are chained clockwise into loops;
    the loop enclosing the largest area is returned, collinear points removed, with the
    first point repeated at the end (a closed POLYLINE, PS3.3 C.18.6.1.2). An empty
    region raises ``ValueError``.
    """
    inside = np.pad(np.asarray(region, dtype=bool), 1)
    if not inside.any():
        raise ValueError("outline: the region is empty")
    nxt: dict[_Point, list[_Point]] = defaultdict(list)
    # Directed edges with the inside on their right, in padded (x, y) corner coordinates.
    for dr, dc, a, b in (
        (-1, 0, (0, 0), (1, 0)),  # top edge, left to right
        (0, 1, (1, 0), (1, 1)),  # right edge, downwards
        (1, 0, (1, 1), (0, 1)),  # bottom edge, right to left
        (0, -1, (0, 1), (0, 0)),  # left edge, upwards
    ):
        neighbour = np.roll(np.roll(inside, -dr, axis=0), -dc, axis=1)
        for r, c in np.argwhere(inside & ~neighbour):
            nxt[(int(c) + a[0], int(r) + a[1])].append((int(c) + b[0], int(r) + b[1]))
    best: list[_Point] = []
    best_area = 0.0
    while nxt:
        start = next(iter(nxt))
        loop = [start]
        point = start
        while True:
            targets = nxt[point]
            following = targets.pop()
            if not targets:
                del nxt[point]
            if following == start:
                break
            loop.append(following)
            point = following
        area = abs(polygon_area(np.array(loop, dtype=np.float64)))
        if area > best_area:
            best, best_area = loop, area
    pts = np.array(best, dtype=np.float64)
    keep = [
        i
        for i in range(len(pts))
        if np.cross(pts[i] - pts[i - 1], pts[(i + 1) % len(pts)] - pts[i]) != 0
    ]
    pts = pts[keep] - 1.0  # undo the padding
    return np.vstack([pts, pts[:1]])


def polygon_area(points: npt.NDArray[np.float64]) -> float:
    """Signed area (shoelace) of a polygon given as (x, y) rows; closing point optional."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
