"""All result objects of one inference result, with per-object timings."""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydicom import Dataset

from models.result import InferenceResult
from node.config import NodeConfig
from node.results.common import SourceIndex
from node.results.sc import build_heatmap_sc
from node.results.seg import build_seg
from node.results.sr import build_sr

__all__ = ["encode_all"]


def encode_all(
    result: InferenceResult,
    sources: Sequence[Dataset],
    cfg: NodeConfig,
    *,
    timings: dict[str, float] | None = None,
) -> list[Dataset]:
    """SEG (segmentation results with a non-empty mask), SR, then the heatmap SCs.

    The SEG is built first so the SR can reference its segments. When ``timings`` is
    given, it receives seconds spent per object kind (``encode_seg_s``, ``encode_sr_s``,
    ``encode_sc_s``) and in total (``encode_s``) for the end-to-end breakdown.
    """
    t0 = time.perf_counter()
    src = SourceIndex(result, sources)
    seg = build_seg(result, src, cfg)
    t1 = time.perf_counter()
    sr = build_sr(result, src, cfg, seg=seg)
    t2 = time.perf_counter()
    scs = build_heatmap_sc(result, src, cfg)
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(
            encode_seg_s=t1 - t0, encode_sr_s=t2 - t1, encode_sc_s=t3 - t2, encode_s=t3 - t0
        )
    return [sr, *([seg] if seg is not None else []), *scs]
