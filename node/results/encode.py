"""All result objects of one inference result, with per-object timings."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime

from pydicom import Dataset

from models.result import InferenceResult
from node.config import NodeConfig
from node.results.common import SourceIndex, stamp, uid_for
from node.results.pr import build_gsps
from node.results.sc import build_heatmap_sc
from node.results.seg import build_seg
from node.results.sr import Predecessor, build_sr
from node.store.db import Database
from node.store.outbox import latest_in_series

__all__ = ["encode_all", "predecessor_for"]


def predecessor_for(db: Database, result: InferenceResult) -> Predecessor | None:
    """The SR that the SR of ``result`` replaces: the newest other one in its series.

    Result series do not depend on the input, instances do (node/results/uids.py): a
    run on changed input finds the earlier run's SR here and names it in Predecessor
    Documents Sequence.
    """
    series = uid_for(result, "sr-series")
    found = latest_in_series(db, series, uid_for(result, "sr"))
    if found is None:
        return None
    sop_class, sop_uid = found
    return Predecessor(result.study_instance_uid, series, sop_class, sop_uid)


def encode_all(
    result: InferenceResult,
    sources: Sequence[Dataset],
    cfg: NodeConfig,
    *,
    timings: dict[str, float] | None = None,
    made_at: datetime | None = None,
    predecessor: Predecessor | None = None,
) -> list[Dataset]:
    """SR, SEG (segmentation results with a non-empty mask), heatmap SCs, then the GSPS.

    ``made_at`` is written as every object's creation, content and series date/time
    (default: now); the worker passes its job's creation time, so a re-run of a job
    gives byte-identical objects. ``predecessor`` is the SR this one replaces
    (:func:`predecessor_for`).

    The SEG is built first so the SR can reference its segments. When ``timings`` is
    given, it receives seconds spent per object kind (``encode_seg_s``, ``encode_sr_s``,
    ``encode_sc_s``, which includes the GSPS) and in total (``encode_s``) for the
    end-to-end breakdown.
    """
    t0 = time.perf_counter()
    src = SourceIndex(result, sources)
    seg = build_seg(result, src, cfg)
    t1 = time.perf_counter()
    sr = build_sr(result, src, cfg, seg=seg, predecessor=predecessor)
    t2 = time.perf_counter()
    scs = build_heatmap_sc(result, src, cfg)
    gsps = build_gsps(result, src, cfg)
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(
            encode_seg_s=t1 - t0, encode_sr_s=t2 - t1, encode_sc_s=t3 - t2, encode_s=t3 - t0
        )
    objects = [sr, *([seg] if seg is not None else []), *scs, *([gsps] if gsps else [])]
    when = made_at or datetime.now()
    for obj in objects:
        stamp(obj, when)
    return objects
