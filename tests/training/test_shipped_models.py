"""The demo packages shipped in models/packages, run through ONNX Runtime on fresh phantoms.

The test sets come from seeds no training or committed evaluation used, so they are
held out.  Thresholds are the ones the demo models promise (docs/training.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.package import load_package
from training.config import load_train_config
from training.pipeline import build_datasets, build_test_set, evaluate_package

REPO = Path(__file__).resolve().parents[2]
PACKAGES = REPO / "models" / "packages"


def _have(name: str) -> bool:
    return (PACKAGES / name / "model.onnx").is_file()


@pytest.mark.skipif(not _have("cxr-nodule"), reason="cxr-nodule package not built")
def test_cxr_nodule_auc_cam_and_beats_baseline() -> None:
    cfg = load_train_config(REPO / "config/train/cxr-nodule.toml")
    pkg = load_package(PACKAGES / "cxr-nodule")
    assert (
        pkg.path.stat() and sum(f.stat().st_size for f in pkg.path.rglob("*") if f.is_file()) < 15e6
    )
    test = build_test_set(cfg, n=160, seed=424242)
    # the baseline is fitted on a fresh, smaller training set to keep the test fast
    small = cfg.model_copy(update={"data": cfg.data.model_copy(update={"n": 300, "seed": 515151})})
    base_train = build_datasets(small)[0]
    res = evaluate_package(cfg, pkg, train_set=base_train, test_set=test)
    cls = res["classification"]
    assert cls["auc"] >= 0.95
    assert cls["cam_localisation"]["peak_inside_share"] >= 0.80
    base = res["baseline"]
    assert cls["auc"] > max(base["random_forest"]["auc"], base["svm_rbf"]["auc"])


@pytest.mark.skipif(not _have("ct-lesion"), reason="ct-lesion package not built")
def test_ct_lesion_dice() -> None:
    cfg = load_train_config(REPO / "config/train/ct-lesion.toml")
    pkg = load_package(PACKAGES / "ct-lesion")
    assert sum(f.stat().st_size for f in pkg.path.rglob("*") if f.is_file()) < 15e6
    test = build_test_set(cfg, n=8, seed=636363)
    seg = evaluate_package(cfg, pkg, test_set=test)["segmentation"]
    assert seg["dice_mean"] >= 0.80


@pytest.mark.skipif(not _have("cxr-nodule"), reason="cxr-nodule package not built")
def test_cxr_nodule_served_from_dicom_points_at_the_nodule() -> None:
    """The node's own path: DICOM (MONOCHROME1 too) → Predictor → Finding.peak on the
    original 512 × 512 grid, which the SR reports as the finding's location."""
    import numpy as np

    from models.phantoms import radiograph_phantom
    from models.pipeline import Predictor
    from node.ops.synthetic import dx_image
    from training.metrics import roc_auc

    predictor = Predictor(load_package(PACKAGES / "cxr-nodule"), "onnxruntime")
    labels: list[int] = []
    scores: list[float] = []
    hits = positives = 0
    for i in range(24):
        ph = radiograph_phantom(909000 + i, size=512, nodule=i % 2 == 0)
        ds = dx_image(
            ph.image,
            rows=512,
            cols=512,
            seed=i,
            photometric=("MONOCHROME1", "MONOCHROME2")[i % 3 > 0],
        )
        finding = predictor.predict([ds]).findings[0]
        labels.append(ph.label)
        scores.append(finding.probability)
        if ph.label:
            positives += 1
            assert finding.peak is not None
            _, r, c = finding.peak
            hits += bool(ph.mask[r, c])
    assert roc_auc(np.array(labels), np.array(scores)) >= 0.95
    assert hits / positives >= 0.80
