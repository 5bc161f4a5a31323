"""The hot region of a heatmap: run-based 4-connected component, checked against a
plain pixel flood fill on random masks."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from node.results.geometry import _component


def _flood(mask: npt.NDArray[np.bool_], row: int, col: int) -> npt.NDArray[np.bool_]:
    out = np.zeros_like(mask, dtype=bool)
    stack = [(row, col)]
    rows, cols = mask.shape
    while stack:
        r, c = stack.pop()
        if r < 0 or c < 0 or r >= rows or c >= cols or out[r, c] or not mask[r, c]:
            continue
        out[r, c] = True
        stack.extend(((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)))
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(1, 30),
    st.floats(0.1, 0.9),
    st.integers(0, 2**32 - 1),
)
def test_component_equals_a_pixel_flood_fill(h: int, w: int, p: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < p
    row, col = int(rng.integers(0, h)), int(rng.integers(0, w))
    np.testing.assert_array_equal(_component(mask, row, col), _flood(mask, row, col))


def test_a_background_seed_gives_an_empty_component() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    assert not _component(mask, 3, 3).any()
