"""Evaluation of a model package on a held-out set, with plots, a baseline and a report.

The package is evaluated through the node's own inference path
(:class:`models.pipeline.Predictor` on the ONNX Runtime backend, the graph the node
actually runs), not through the torch weights.  Classification: AUC with a bootstrap 95% CI,
sensitivity / specificity / PPV / NPV / F1 and the confusion matrix at the manifest's
operating threshold, calibration (ECE, reliability plot), ROC and PR curves, and CAM
localisation (share of all positives whose heatmap peak lies inside the lesion
mask).  Segmentation: Dice and IoU per case (per volume) plus the
lesion-volume error.  A classical baseline (random forest and RBF-SVM on hand-crafted
intensity and texture features, scikit-learn) is trained on the CNN's training split
and scored on the same test set.  Results go to ``results.json`` and ``report.md``
with PNG plots next to them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.package import ModelPackage
from training.datasets import ArraySet
from training.metrics import (
    bootstrap_auc_ci,
    cam_peak,
    confusion,
    dice,
    expected_calibration_error,
    iou,
    peak_inside,
    pr_curve,
    reliability,
    roc_auc,
    roc_curve,
)

__all__ = [
    "baseline_features",
    "evaluate_classification",
    "evaluate_segmentation",
    "run_baselines",
    "write_report",
]

F32 = npt.NDArray[np.float32]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x.astype(np.float64))))


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# ------------------------------------------------------------------ classification


def evaluate_classification(
    probs: np.ndarray,
    test: ArraySet,
    threshold: float,
    *,
    cams: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics for the first label's probabilities ``probs`` (N,) on ``test``."""
    y = test.labels
    p = np.asarray(probs, dtype=np.float64).ravel()
    auc = roc_auc(y, p)
    lo, hi = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {
        "n": len(y),
        "n_positive": int(y.sum()),
        "auc": auc,
        "auc_ci95": [lo, hi],
        "at_threshold": confusion(y, p, threshold).as_dict(),
        "ece": expected_calibration_error(y, p),
    }
    if cams is not None and test.masks is not None:
        size = (int(test.images.shape[2]), int(test.images.shape[3]))
        hits, hits_grid, dists = [], [], []
        for i in np.nonzero(y == 1)[0]:
            cam = cams[i, 0]
            pk = cam_peak(cam, size, refine=True)
            hits.append(peak_inside(pk, test.masks[i]))
            hits_grid.append(peak_inside(cam_peak(cam, size, refine=False), test.masks[i]))
            c = test.centres[i]
            if c is not None:
                dists.append(float(np.hypot(pk[0] - c[0], pk[1] - c[1])))
        out["cam_localisation"] = {
            "peak_inside_share": float(np.mean(hits)) if hits else float("nan"),
            "peak_inside_share_unrefined": float(np.mean(hits_grid)) if hits_grid else float("nan"),
            "median_peak_distance_px": float(np.median(dists)) if dists else float("nan"),
            "cam_shape": list(cams.shape[2:]),
        }
    return out


def baseline_features(images: F32) -> npt.NDArray[np.float64]:
    """Hand-crafted features per image (first channel), as in radiomics-style baselines.

    Intensity histogram statistics (mean, std, skewness, kurtosis, percentiles),
    gradient-magnitude statistics, and grey-level co-occurrence (GLCM) contrast,
    homogeneity, energy and correlation at one-pixel offsets on 16 grey levels
    (Haralick et al. 1973), on a 2x-downsampled image.
    """
    feats = []
    for img in images[:, 0]:
        a = img[: img.shape[0] // 2 * 2, : img.shape[1] // 2 * 2]
        a = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).mean((1, 3)).astype(np.float64)
        v = a.ravel()
        mu, sd = v.mean(), v.std() + 1e-9
        z = (v - mu) / sd
        f = [mu, sd, (z**3).mean(), (z**4).mean(), *np.percentile(v, [1, 5, 25, 50, 75, 95, 99])]
        gy, gx = np.gradient(a)
        g = np.hypot(gy, gx).ravel()
        f += [g.mean(), g.std(), *np.percentile(g, [50, 90, 99])]
        lo, hi = np.percentile(v, [0.5, 99.5])
        q = np.clip(((a - lo) / max(hi - lo, 1e-9) * 16).astype(int), 0, 15)
        for dy, dx in ((0, 1), (1, 0), (1, 1)):
            i_ = q[: q.shape[0] - dy, : q.shape[1] - dx].ravel()
            j_ = q[dy:, dx:].ravel()
            glcm = np.bincount(i_ * 16 + j_, minlength=256).reshape(16, 16).astype(np.float64)
            glcm = glcm + glcm.T
            glcm /= glcm.sum()
            ii, jj = np.mgrid[0:16, 0:16]
            mi, mj = (glcm * ii).sum(), (glcm * jj).sum()
            si = np.sqrt((glcm * (ii - mi) ** 2).sum()) + 1e-9
            sj = np.sqrt((glcm * (jj - mj) ** 2).sum()) + 1e-9
            f += [
                (glcm * (ii - jj) ** 2).sum(),
                (glcm / (1 + np.abs(ii - jj))).sum(),
                (glcm**2).sum(),
                (glcm * (ii - mi) * (jj - mj)).sum() / (si * sj),
            ]
        feats.append(f)
    return np.asarray(feats, dtype=np.float64)


def run_baselines(
    train: ArraySet, test: ArraySet, *, seed: int = 0, n_boot: int = 1000
) -> dict[str, Any]:
    """Random forest and SVM on :func:`baseline_features`, fitted on ``train``."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    xtr, xte = baseline_features(train.images), baseline_features(test.images)
    models = {
        "random_forest": RandomForestClassifier(
            n_estimators=300, random_state=seed, n_jobs=1, class_weight="balanced"
        ),
        "svm_rbf": make_pipeline(
            StandardScaler(),
            SVC(C=1.0, kernel="rbf", random_state=seed, class_weight="balanced"),
        ),
    }
    out: dict[str, Any] = {"n_features": int(xtr.shape[1]), "n_train": len(train)}
    for name, model in models.items():
        model.fit(xtr, train.labels)
        if hasattr(model, "predict_proba"):
            p = model.predict_proba(xte)[:, 1]
        else:  # SVM: the decision value through a logistic, so 0.5 is its own boundary
            p = _sigmoid(model.decision_function(xte))
        lo, hi = bootstrap_auc_ci(test.labels, p, n_boot=n_boot, seed=seed)
        out[name] = {
            "auc": roc_auc(test.labels, p),
            "auc_ci95": [lo, hi],
            "at_threshold": confusion(test.labels, p, 0.5).as_dict(),
            "scores": p,
        }
    return out


# -------------------------------------------------------------------- segmentation


def evaluate_segmentation(
    pred: npt.NDArray[np.integer], test: ArraySet, voxel_volume_mm3: float | None = None
) -> dict[str, Any]:
    """Dice and IoU per case (``test.groups``: the volume a slice belongs to)."""
    if test.masks is None:
        raise ValueError("segmentation evaluation needs ground-truth masks")
    cases: dict[str, list[int]] = {}
    for i, g in enumerate(test.groups):
        cases.setdefault(g, []).append(i)
    per_case = []
    for g, ix in cases.items():
        p, t = pred[ix] > 0, test.masks[ix] > 0
        row: dict[str, Any] = {
            "case": g,
            "dice": dice(p, t),
            "iou": iou(p, t),
            "true_voxels": int(t.sum()),
            "pred_voxels": int(p.sum()),
        }
        if voxel_volume_mm3 is not None:
            row["true_volume_mm3"] = float(t.sum()) * voxel_volume_mm3
            row["pred_volume_mm3"] = float(p.sum()) * voxel_volume_mm3
        per_case.append(row)
    with_lesion = [r for r in per_case if r["true_voxels"] > 0]
    d = np.array([r["dice"] for r in per_case])
    out: dict[str, Any] = {
        "n_cases": len(per_case),
        "n_cases_with_lesion": len(with_lesion),
        "dice_mean": float(d.mean()),
        "dice_median": float(np.median(d)),
        "iou_mean": float(np.mean([r["iou"] for r in per_case])),
        "dice_mean_cases_with_lesion": float(np.mean([r["dice"] for r in with_lesion]))
        if with_lesion
        else float("nan"),
        "dice_pooled": dice(pred > 0, test.masks > 0),
        "per_case": per_case,
    }
    if with_lesion and voxel_volume_mm3 is not None:
        rel = [
            abs(r["pred_volume_mm3"] - r["true_volume_mm3"]) / r["true_volume_mm3"]
            for r in with_lesion
        ]
        out["volume_relative_error_median"] = float(np.median(rel))
    return out


# ------------------------------------------------------------------------- reports


def _plots(out_dir: Path, y: np.ndarray, curves: dict[str, np.ndarray]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, p in curves.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=100)
    plt.close(fig)
    files.append("roc.png")

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, p in curves.items():
        rec, prec, _ = pr_curve(y, p)
        ax.plot(rec, prec, label=name)
    ax.axhline(float(y.mean()), color="k", ls=":", lw=0.8)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "pr.png", dpi=100)
    plt.close(fig)
    files.append("pr.png")

    main = next(iter(curves.values()))
    conf, freq, counts = reliability(y, main)
    fig, ax = plt.subplots(figsize=(5, 5))
    used = counts > 0
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot(conf[used], freq[used], "o-")
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title="Reliability")
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=100)
    plt.close(fig)
    files.append("reliability.png")
    return files


def _dice_plot(out_dir: Path, seg: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    d = [r["dice"] for r in seg["per_case"]]
    ax.hist(d, bins=20, range=(0, 1))
    ax.set(xlabel="Dice per case", ylabel="cases", title="Segmentation Dice")
    fig.tight_layout()
    fig.savefig(out_dir / "dice.png", dpi=100)
    plt.close(fig)
    return "dice.png"


def _cam_examples(out_dir: Path, test: ArraySet, cams: np.ndarray, n: int = 6) -> str:
    """The first ``n`` positives: image, CAM (bilinear) overlay, nodule outline, peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    idx = [int(i) for i in np.nonzero(test.labels == 1)[0][:n]]
    size = (int(test.images.shape[2]), int(test.images.shape[3]))
    fig, axes = plt.subplots(1, len(idx), figsize=(2.6 * len(idx), 2.9))
    for ax, i in zip(np.atleast_1d(axes), idx, strict=True):
        up = F.interpolate(
            torch.from_numpy(cams[i : i + 1, :1].astype(np.float32)),
            size=size,
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        ax.imshow(test.images[i, 0], cmap="gray")
        ax.imshow(up, cmap="jet", alpha=0.35)
        if test.masks is not None:
            ax.contour(test.masks[i], levels=[0.5], colors="white", linewidths=0.8)
        pk = cam_peak(cams[i, 0], size)
        hit = test.masks is not None and peak_inside(pk, test.masks[i])
        ax.plot(pk[1], pk[0], "+", color="lime" if hit else "red", ms=12, mew=2)
        ax.set_axis_off()
    fig.suptitle("CAM (colour), nodule outline (white), refined peak (+ green inside, red outside)")
    fig.tight_layout()
    fig.savefig(out_dir / "cam_examples.png", dpi=90)
    plt.close(fig)
    return "cam_examples.png"


def _seg_examples(out_dir: Path, test: ArraySet, pred: np.ndarray, n: int = 6) -> str:
    """The largest-lesion slice of the first ``n`` cases: truth (green), prediction (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert test.masks is not None
    picks: list[int] = []
    for g in dict.fromkeys(test.groups):
        ix = [i for i, gg in enumerate(test.groups) if gg == g]
        areas = [int(test.masks[i].sum()) for i in ix]
        if max(areas) > 0:
            picks.append(ix[int(np.argmax(areas))])
        if len(picks) == n:
            break
    if not picks:
        picks = [0]
    fig, axes = plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 2.9))
    for ax, i in zip(np.atleast_1d(axes), picks, strict=True):
        ax.imshow(test.images[i, 0], cmap="gray")
        ax.contour(test.masks[i], levels=[0.5], colors="lime", linewidths=1.6)
        if pred[i].any():
            ax.contour(pred[i] > 0, levels=[0.5], colors="red", linewidths=0.8, linestyles="--")
        ax.set_title(test.groups[i], fontsize=7)
        ax.set_axis_off()
    fig.suptitle("Lesion: ground truth (green), prediction (red, dashed)")
    fig.tight_layout()
    fig.savefig(out_dir / "seg_examples.png", dpi=90)
    plt.close(fig)
    return "seg_examples.png"


def write_report(
    out_dir: str | Path,
    package: ModelPackage,
    results: dict[str, Any],
    *,
    y: np.ndarray | None = None,
    curves: dict[str, np.ndarray] | None = None,
    cam_examples: tuple[ArraySet, np.ndarray] | None = None,
    seg_examples: tuple[ArraySet, np.ndarray] | None = None,
) -> Path:
    """Write ``results.json``, plots and ``report.md`` into ``out_dir``; returns the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    if y is not None and curves:
        plots = _plots(out, y, curves)
    if cam_examples is not None and int(cam_examples[0].labels.sum()) > 0:
        plots.append(_cam_examples(out, *cam_examples))
    if "segmentation" in results:
        plots.append(_dice_plot(out, results["segmentation"]))
    if seg_examples is not None and seg_examples[0].masks is not None:
        plots.append(_seg_examples(out, *seg_examples))
    (out / "results.json").write_text(json.dumps(_clean(results), indent=2) + "\n", "utf-8")
    lines = [
        f"# Evaluation: {package.name} {package.version}",
        "",
        "Synthetic phantoms only; not a clinical performance claim.",
        "",
        f"- test set: {results['test_set']}",
        f"- evaluated through ONNX Runtime ({package.onnx_path.name})",
        "",
    ]
    lines += summary_lines(results)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Markdown lines with the headline figures (shared by report and model card)."""
    lines: list[str] = []
    cls = results.get("classification")
    if cls:
        t = cls["at_threshold"]
        lo, hi = cls["auc_ci95"]
        lines += [
            "| metric | value |",
            "|---|---|",
            f"| cases (positive) | {cls['n']} ({cls['n_positive']}) |",
            f"| AUC (95% bootstrap CI) | {cls['auc']:.4f} ({lo:.4f}-{hi:.4f}) |",
            f"| threshold | {t['threshold']:.2f} |",
            f"| sensitivity | {t['sensitivity']:.4f} |",
            f"| specificity | {t['specificity']:.4f} |",
            f"| PPV | {t['ppv']:.4f} |",
            f"| NPV | {t['npv']:.4f} |",
            f"| F1 | {t['f1']:.4f} |",
            f"| confusion [[TN, FP], [FN, TP]] | {t['confusion_matrix']} |",
            f"| ECE (10 bins) | {cls['ece']:.4f} |",
        ]
        loc = cls.get("cam_localisation")
        if loc:
            lines += [
                f"| CAM peak inside nodule (refined peak) | {loc['peak_inside_share']:.4f} |",
                "| CAM peak inside nodule (cell centre) | "
                f"{loc['peak_inside_share_unrefined']:.4f} |",
                f"| median peak-to-centre distance (px) | {loc['median_peak_distance_px']:.1f} |",
            ]
    base = results.get("baseline")
    if base:
        lines += ["", "### Classical baseline (same training split, same test set)", ""]
        lines += ["| model | AUC (95% CI) |", "|---|---|"]
        if cls:
            lines.append(f"| CNN (this package) | {cls['auc']:.4f} |")
        for name in ("random_forest", "svm_rbf"):
            b = base[name]
            lines.append(
                f"| {name} | {b['auc']:.4f} ({b['auc_ci95'][0]:.4f}-{b['auc_ci95'][1]:.4f}) |"
            )
    seg = results.get("segmentation")
    if seg:
        lines += [
            "| metric | value |",
            "|---|---|",
            f"| cases (with lesion) | {seg['n_cases']} ({seg['n_cases_with_lesion']}) |",
            f"| Dice, mean per case | {seg['dice_mean']:.4f} |",
            f"| Dice, median per case | {seg['dice_median']:.4f} |",
            f"| Dice, mean over cases with lesion | {seg['dice_mean_cases_with_lesion']:.4f} |",
            f"| Dice, pooled voxels | {seg['dice_pooled']:.4f} |",
            f"| IoU, mean per case | {seg['iou_mean']:.4f} |",
        ]
        if "volume_relative_error_median" in seg:
            lines.append(
                "| lesion volume, median relative error | "
                f"{seg['volume_relative_error_median']:.4f} |"
            )
    return lines
