"""Shipped packages on the external generator, through the node's own predictor.

Every image goes DICOM data set → :class:`models.pipeline.Predictor` (ONNX Runtime)
→ :class:`models.result.InferenceResult`, the path the worker runs, so what is
measured here is what a site would get.  Used by
``tests/training/test_shipped_models.py`` (small, fresh seeds) and
``bench/external_eval.py`` (the committed reports in ``docs/evaluation/external``).

Definitions:

* radiographs: AUC over all images; sensitivity and specificity at the manifest
  threshold; "target" subgroup = nodules >= 5 mm at contrast >= 0.2 of the lung /
  soft-tissue gap, against all negatives; CAM-in-nodule = share of positives whose
  ``Finding.peak`` lies inside the nodule disc; the same images stored at 8, 10,
  12, 14, 16 bits (MONOCHROME2) and at 12 bits MONOCHROME1 give one AUC each;
* CT: Dice per volume over volumes with a lesion; a lesion is detected when a
  predicted connected component (26-connected) overlaps it; a predicted component
  that overlaps no lesion is a false positive; all by lesion size and contrast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from models.package import ModelPackage
from models.pipeline import Predictor
from tests.external.phantoms import external_ct, external_radiograph, store_dx
from training.metrics import roc_auc

__all__ = ["BIT_VARIANTS", "evaluate_ct", "evaluate_cxr", "size_bin"]

BIT_VARIANTS: tuple[tuple[int, str], ...] = (
    (8, "MONOCHROME2"),
    (10, "MONOCHROME2"),
    (12, "MONOCHROME2"),
    (14, "MONOCHROME2"),
    (16, "MONOCHROME2"),
    (12, "MONOCHROME1"),
)
SIZE_BINS = ((3.0, 5.0), (5.0, 8.0), (8.0, 15.0), (15.0, 30.01))


def size_bin(d: float) -> str:
    for lo, hi in SIZE_BINS:
        if lo <= d < hi:
            return f"{lo:g}-{min(hi, 30):g} mm"
    return "other"


def _contrast_bin(c: float) -> str:
    for lo, hi in ((0.0, 0.2), (0.2, 0.5), (0.5, 1.01)):
        if lo <= c < hi:
            return f"{lo:g}-{min(hi, 1.0):g}"
    return "other"


def _sens_spec(y: np.ndarray, p: np.ndarray, thr: float) -> tuple[float, float]:
    pos, neg = y == 1, y == 0
    sens = float((p[pos] >= thr).mean()) if pos.any() else float("nan")
    spec = float((p[neg] < thr).mean()) if neg.any() else float("nan")
    return sens, spec


def evaluate_cxr(
    package: ModelPackage,
    n: int,
    seed: int,
    *,
    variants: Sequence[tuple[int, str]] = ((12, "MONOCHROME2"),),
    size: int = 512,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``n`` external radiographs (half positive), each stored in every ``variant``."""
    predictor = Predictor(package, "onnxruntime")
    thr = package.manifest.output.labels[0].threshold
    y, diam, con = [], [], []
    scores: dict[str, list[float]] = {f"{b}-bit {ph}": [] for b, ph in variants}
    cam_hits: list[bool] = []
    seconds = 0.0
    for i in range(n):
        img = external_radiograph(seed + i, nodule=i % 2 == 0, size=size)
        y.append(img.label)
        diam.append(img.diameter_mm)
        con.append(img.contrast)
        for j, (bits, ph) in enumerate(variants):
            ds = store_dx(img, bits=bits, photometric=ph, seed=seed + i)
            t0 = time.perf_counter()
            finding = predictor.predict([ds]).findings[0]
            seconds += time.perf_counter() - t0
            scores[f"{bits}-bit {ph}"].append(finding.probability)
            if j == 0 and img.label:
                assert finding.peak is not None
                _, r, c = finding.peak
                cam_hits.append(bool(img.mask[r, c]))
        if progress is not None:
            progress(i)
    ya, da, ca = np.asarray(y), np.asarray(diam), np.asarray(con)
    main = next(iter(scores))
    p = np.asarray(scores[main])
    sens, spec = _sens_spec(ya, p, thr)
    target = (ya == 0) | ((da >= 5.0) & (ca >= 0.2))
    t_sens, t_spec = _sens_spec(ya[target], p[target], thr)
    pos_idx = np.flatnonzero(ya == 1)
    subgroups = []
    for name, key in (
        ("size", [size_bin(d) for d in da]),
        ("contrast", [_contrast_bin(c) for c in ca]),
    ):
        for group in sorted({key[k] for k in pos_idx}):
            sel = np.array([key[k] == group for k in range(len(ya))]) & (ya == 1)
            subset = sel | (ya == 0)
            hits = [cam_hits[list(pos_idx).index(k)] for k in np.flatnonzero(sel)]
            subgroups.append(
                {
                    "by": name,
                    "group": group,
                    "n_pos": int(sel.sum()),
                    "auc_vs_all_negatives": roc_auc(ya[subset], p[subset]),
                    "sensitivity": float((p[sel] >= thr).mean()),
                    "cam_in_nodule": float(np.mean(hits)) if hits else float("nan"),
                }
            )
    per_variant = {k: roc_auc(ya, np.asarray(v)) for k, v in scores.items()}
    return {
        "n": n,
        "n_pos": int(ya.sum()),
        "threshold": thr,
        "stored_as": main,
        "auc": roc_auc(ya, p),
        "sensitivity": sens,
        "specificity": spec,
        "target": {
            "definition": "nodules >= 5 mm at contrast >= 0.2, against all negatives",
            "n_pos": int((target & (ya == 1)).sum()),
            "auc": roc_auc(ya[target], p[target]),
            "sensitivity": t_sens,
            "specificity": t_spec,
            "cam_in_nodule": float(
                np.mean(
                    [cam_hits[list(pos_idx).index(k)] for k in np.flatnonzero(target & (ya == 1))]
                )
            ),
        },
        "cam_in_nodule": float(np.mean(cam_hits)) if cam_hits else float("nan"),
        "auc_by_storage": per_variant,
        "auc_spread_by_storage": float(max(per_variant.values()) - min(per_variant.values())),
        "max_probability_spread_per_image": float(
            np.max(np.ptp(np.asarray(list(scores.values())), axis=0))
        )
        if len(scores) > 1
        else 0.0,
        "subgroups": subgroups,
        "cpu_seconds_per_image": seconds / max(1, n * len(variants)),
        "scores": {k: [float(v) for v in vs] for k, vs in scores.items()},
        "labels": [int(v) for v in ya],
    }


def evaluate_ct(
    package: ModelPackage,
    n: int,
    seed: int,
    *,
    n_slices: int = 40,
    size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``n`` external CT volumes with 0-3 lesions each."""
    predictor = Predictor(package, "onnxruntime")
    structure = np.ones((3, 3, 3), dtype=bool)
    dices: list[float] = []
    fp_per_volume: list[int] = []
    lesions: list[dict[str, Any]] = []
    seconds = 0.0
    for i in range(n):
        vol = external_ct(seed + i, n_slices=n_slices, size=size)
        t0 = time.perf_counter()
        result = predictor.predict(vol.datasets)
        seconds += time.perf_counter() - t0
        assert result.mask is not None
        pred = result.mask > 0
        truth = vol.mask
        if truth.any():
            dices.append(float(2 * (pred & truth).sum() / (pred.sum() + truth.sum())))
        comps, n_comp = ndimage.label(pred, structure=structure)
        fp = 0
        for c in range(1, n_comp + 1):
            if not truth[comps == c].any():
                fp += 1
        fp_per_volume.append(fp)
        for k, (d, dhu, site) in enumerate(vol.lesions):
            sel = vol.labels == k + 1
            if not sel.any():
                continue
            lesions.append(
                {
                    "diameter_mm": d,
                    "delta_hu": dhu,
                    "site": site,
                    "detected": bool(pred[sel].any()),
                    "dice": _lesion_dice(pred, sel),
                }
            )
        if progress is not None:
            progress(i)
    det = np.array([x["detected"] for x in lesions], dtype=bool)
    big = np.array([x["diameter_mm"] >= 8.0 for x in lesions], dtype=bool)
    subgroups = []
    for name, key in (
        ("size", [size_bin(x["diameter_mm"]) for x in lesions]),
        ("contrast", [_hu_bin(x) for x in lesions]),
    ):
        for group in sorted(set(key)):
            sel = np.array([k == group for k in key])
            subgroups.append(
                {
                    "by": name,
                    "group": group,
                    "n": int(sel.sum()),
                    "detection": float(det[sel].mean()),
                    "dice": float(np.mean([lesions[j]["dice"] for j in np.flatnonzero(sel)])),
                }
            )
    return {
        "n_volumes": n,
        "n_with_lesions": len(dices),
        "n_lesions": len(lesions),
        "dice_mean": float(np.mean(dices)) if dices else float("nan"),
        "dice_median": float(np.median(dices)) if dices else float("nan"),
        "detection": float(det.mean()) if det.size else float("nan"),
        "detection_ge_8mm": float(det[big].mean()) if big.any() else float("nan"),
        "lesion_dice_ge_8mm": float(np.mean([x["dice"] for x in lesions if x["diameter_mm"] >= 8]))
        if big.any()
        else float("nan"),
        "fp_components_per_volume": float(np.mean(fp_per_volume)),
        "subgroups": subgroups,
        "lesions": lesions,
        "cpu_seconds_per_volume": seconds / max(1, n),
        "slices_per_volume": n_slices,
    }


def _lesion_dice(pred: np.ndarray, sel: np.ndarray) -> float:
    """Dice of one lesion against the prediction in its neighbourhood (3 voxels)."""
    near = pred & np.asarray(ndimage.binary_dilation(sel, iterations=3))
    return float(2 * (near & sel).sum() / (near.sum() + sel.sum()))


def _hu_bin(lesion: dict[str, Any]) -> str:
    if lesion["site"] == "lung":
        return "lung, solid"
    d = abs(lesion["delta_hu"])
    sign = "hypo" if lesion["delta_hu"] < 0 else "hyper"
    return f"liver {sign}, ΔHU {'15-30' if d < 30 else '30-60'} (abs)"
