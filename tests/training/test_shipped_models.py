"""The demo packages shipped in models/packages, on the EXTERNAL test generator.

``tests/external/phantoms.py`` was written separately from the training generator and
is never used for training, model selection or thresholds.  Every image goes through
the node's own predictor (DICOM data set → ``models.pipeline.Predictor`` → result), on
seeds that neither training nor the committed report (``bench/external_eval.py``)
used.  The thresholds are the targets of docs/models.md; the committed report has the
figures on larger sets.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.package import load_package, parse_manifest
from models.pipeline import Predictor
from tests.external.evaluate import evaluate_ct, evaluate_cxr
from tests.external.phantoms import external_radiograph, store_dx

REPO = Path(__file__).resolve().parents[2]
PACKAGES = REPO / "models" / "packages"


CT_MISS = (
    "ct-lesion 2.0.0 misses the issue's targets on the external generator (Dice 0.39, "
    "detection of lesions >= 8 mm 0.42; docs/evaluation/external/report.md)"
)


def _have(name: str) -> bool:
    return (PACKAGES / name / "model.onnx").is_file()


def _size_mb(name: str) -> float:
    return sum(f.stat().st_size for f in (PACKAGES / name).rglob("*") if f.is_file()) / 1e6


@pytest.mark.parametrize("name", ["cxr-nodule", "ct-lesion"])
def test_package_matches_its_training_config(name: str) -> None:
    """The shipped manifest is the config's (guards and grey levels included), plus the
    training inputs' reference statistics for the out-of-distribution score."""
    cfg = tomllib.loads((REPO / f"config/train/{name}.toml").read_text())
    shipped = load_package(PACKAGES / name).manifest
    assert shipped.input.reference is not None
    no_ref = shipped.input.model_copy(update={"reference": None})
    assert shipped.model_copy(update={"input": no_ref}) == parse_manifest(cfg["manifest"])
    assert _size_mb(name) < 15


@pytest.fixture(scope="module")
def cxr_external() -> dict[str, Any]:
    if not _have("cxr-nodule"):
        pytest.skip("cxr-nodule package not built")
    return evaluate_cxr(load_package(PACKAGES / "cxr-nodule"), 60, 424200)


@pytest.fixture(scope="module")
def ct_external() -> dict[str, Any]:
    if not _have("ct-lesion"):
        pytest.skip("ct-lesion package not built")
    return evaluate_ct(load_package(PACKAGES / "ct-lesion"), 6, 636300, n_slices=32)


def test_cxr_nodule_no_worse_than_shipped_on_the_external_generator(
    cxr_external: dict[str, Any],
) -> None:
    """Regression floor below what 2.0.0 reaches on these seeds (AUC 0.73): far from the
    targets of the next test."""
    target = cxr_external["target"]
    assert target["auc"] >= 0.65, target
    assert target["specificity"] >= 0.90, target


@pytest.mark.xfail(
    strict=True,
    reason="cxr-nodule 2.0.0 misses the issue's targets on the external generator "
    "(AUC 0.68, CAM in nodule 0.17 for nodules >= 5 mm at contrast >= 0.2; "
    "docs/evaluation/external/report.md)",
)
def test_cxr_nodule_meets_the_targets_on_the_external_generator(
    cxr_external: dict[str, Any],
) -> None:
    target = cxr_external["target"]
    assert target["auc"] >= 0.95, target
    assert target["specificity"] >= 0.90, target
    assert target["cam_in_nodule"] >= 0.80, target


@pytest.mark.skipif(not _have("cxr-nodule"), reason="cxr-nodule package not built")
def test_cxr_nodule_does_not_care_how_the_radiograph_was_stored() -> None:
    """The same radiograph at 8, 10, 12, 14, 16 bits and as MONOCHROME1: one answer."""
    predictor = Predictor(load_package(PACKAGES / "cxr-nodule"), "onnxruntime")
    for i in range(4):
        img = external_radiograph(515100 + i, nodule=i % 2 == 0)
        probs = [
            predictor.predict([store_dx(img, bits=b, photometric=ph, seed=i)])
            .findings[0]
            .probability
            for b, ph in (
                (8, "MONOCHROME2"),
                (10, "MONOCHROME2"),
                (12, "MONOCHROME2"),
                (14, "MONOCHROME2"),
                (16, "MONOCHROME2"),
                (12, "MONOCHROME1"),
                (16, "MONOCHROME1"),
            )
        ]
        assert float(np.ptp(probs)) <= 0.05, probs


def test_ct_lesion_no_worse_than_shipped_on_the_external_generator(
    ct_external: dict[str, Any],
) -> None:
    """The false-positive target holds (0.33 per volume on these seeds); regression
    floors below what 2.0.0 reaches on the others (Dice 0.31, detection >= 8 mm 0.75)."""
    assert ct_external["fp_components_per_volume"] <= 1.0, ct_external["fp_components_per_volume"]
    assert ct_external["detection_ge_8mm"] >= 0.5, ct_external["subgroups"]
    assert ct_external["dice_mean"] >= 0.2, ct_external["dice_mean"]


@pytest.mark.xfail(strict=True, reason=CT_MISS)
def test_ct_lesion_meets_the_targets_on_the_external_generator(
    ct_external: dict[str, Any],
) -> None:
    assert ct_external["dice_mean"] >= 0.80, ct_external["dice_mean"]
    assert ct_external["detection_ge_8mm"] >= 0.90, ct_external["subgroups"]
    assert ct_external["fp_components_per_volume"] <= 1.0, ct_external["fp_components_per_volume"]
