"""The out-of-distribution score: training-like inputs score low, foreign ones high."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.ood import FEATURES, input_features, ood_score, reference_from
from models.package import InputSpec, load_package, write_manifest
from models.pipeline import Predictor
from tests.models.helpers import make_image, manifest, write_package_dir


def _scene(rng: np.random.Generator, n: int = 96) -> np.ndarray:
    """Training-like images: a bright disc of random size and place on noise."""
    y, x = np.mgrid[0:n, 0:n]
    r = rng.uniform(10, 30)
    cy, cx = rng.uniform(30, 66, 2)
    img = 800 + 1200 * (((y - cy) ** 2 + (x - cx) ** 2) < r * r) + rng.normal(0, 60, (n, n))
    return np.asarray(np.clip(img, 0, 4095), dtype=np.uint16)


def _prepared(spec: InputSpec, pixels: np.ndarray) -> np.ndarray:
    x, _ = spec.prepare(pixels, make_image(pixels))
    return x


def test_foreign_inputs_score_above_the_threshold_and_the_predictor_reports_it(
    tmp_path: Path,
) -> None:
    data = manifest("classification", size=(64, 64))
    data["input"].update(grey_levels=["percentile"], window_center=None, window_width=None)
    data["input"] = {k: v for k, v in data["input"].items() if v is not None}
    spec = InputSpec.model_validate(data["input"])
    rng = np.random.default_rng(0)
    train = np.stack([_prepared(spec, _scene(rng)) for _ in range(200)])
    ref = reference_from(train)
    assert len(ref["mean"]) == len(FEATURES)  # type: ignore[arg-type]
    data["input"]["reference"] = ref
    pkg = load_package(write_package_dir(tmp_path / "p", data))
    assert pkg.manifest.input.reference is not None  # survives the TOML round trip
    write_manifest(tmp_path / "again", pkg.manifest)
    predictor = Predictor(pkg, "fake")

    inside = [predictor.predict([make_image(_scene(rng))]) for _ in range(10)]
    assert sum(r.out_of_domain for r in inside) <= 1
    checker = ((np.indices((96, 96)).sum(0) // 2) % 2 * 3000).astype(np.uint16)
    flat_noise = rng.integers(0, 4095, (96, 96)).astype(np.uint16)
    for foreign in (checker, flat_noise):
        res = predictor.predict([make_image(foreign)])
        assert res.ood_score is not None and res.out_of_domain, res.ood_score
    assert all(r.ood_score is not None and r.ood_score >= 0 for r in inside)


def test_score_is_the_median_over_images_and_zero_at_the_mean() -> None:
    x = np.random.default_rng(1).normal(0, 1, (1, 32, 32)).astype(np.float32)
    f = input_features(x)
    assert ood_score(f, list(f), list(np.ones_like(f))) == 0.0
    far = f + 10.0
    assert ood_score([f, f, far], list(f), list(np.ones_like(f))) == 0.0
