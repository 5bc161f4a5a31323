"""End to end on a tiny config: train → export (ONNX verified) → evaluate → report and card."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from models.package import load_package
from training.config import parse_train_config
from training.pipeline import run_training

REPO = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_package_report_and_card(tmp_path: Path) -> None:
    data = tomllib.loads((REPO / "config/train/cxr-nodule.toml").read_text())
    data["run"]["output_dir"] = str(tmp_path / "runs")
    data["data"].update(n=24)
    data["train"].update(epochs=1, batch_size=8, progress=False, threads=1)
    data["eval"].update(n=20, n_boot=20, report_dir=str(tmp_path / "report"), baseline=True)
    data["export"]["package_dir"] = str(tmp_path / "pkg")
    data["manifest"]["model"]["arch_kwargs"] = {"base_width": 4}
    data["manifest"]["input"]["size"] = [64, 64]
    cfg = parse_train_config(data)
    summary = run_training(cfg)

    pkg = load_package(tmp_path / "pkg")
    assert pkg.onnx_path.is_file()
    card = pkg.model_card_path.read_text()
    assert "NOT FOR CLINICAL USE" in card and "Synthetic phantoms only" in card
    assert "27925004" in card and "AUC" in card
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["classification"]["n"] == 20
    assert set(results["baseline"]) >= {"random_forest", "svm_rbf"}
    for name in ("report.md", "roc.png", "pr.png", "reliability.png", "cam_examples.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert (tmp_path / "runs" / "cxr-nodule" / "log.csv").is_file()
    assert summary.results is not None
    assert summary.results["classification"]["auc"] == results["classification"]["auc"]

    # the same package through `airnode evaluate` on a different fresh set
    import typer

    from training.cli import register

    cfg_file = tmp_path / "cfg.toml"
    text = (REPO / "config/train/cxr-nodule.toml").read_text()
    cfg_file.write_text(text.replace("size = [256, 256]", "size = [64, 64]"))
    app = typer.Typer()
    register(app)
    out = tmp_path / "eval2"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(cfg_file),
            "--package",
            str(tmp_path / "pkg"),
            "--out",
            str(out),
            "--n",
            "12",
            "--seed",
            "31337",
            "--no-baseline",
        ],
    )
    assert result.exit_code == 0, result.output
    again = json.loads((out / "results.json").read_text())
    assert again["classification"]["n"] == 12 and "baseline" not in again
    assert "training" not in again
    # re-evaluating into the run's own report keeps its training record
    args = ["evaluate", str(cfg_file), "--package", str(tmp_path / "pkg")]
    args += ["--out", str(tmp_path / "report"), "--n", "12", "--no-baseline"]
    assert CliRunner().invoke(app, args).exit_code == 0
    rewritten = json.loads((tmp_path / "report" / "results.json").read_text())
    assert rewritten["training"] == results["training"]
    assert rewritten["classification"]["n"] == 12


def test_cross_validation_scores_every_fold(tmp_path: Path) -> None:
    from training.pipeline import cross_validate

    data = tomllib.loads((REPO / "config/train/cxr-nodule.toml").read_text())
    data["data"].update(n=18, native_size=64)
    data["train"].update(epochs=1, batch_size=6, progress=False, threads=1)
    data["export"] = {}
    data["manifest"]["model"]["arch_kwargs"] = {"base_width": 4}
    data["manifest"]["input"]["size"] = [64, 64]
    result = cross_validate(parse_train_config(data), k=3)
    assert result["k"] == 3 and len(result["scores"]) == 3
    assert all(0.0 <= s <= 1.0 for s in result["scores"])
    assert min(result["scores"]) <= result["mean"] <= max(result["scores"])


def test_image_folder_source_trains_and_evaluates_on_the_validation_split(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from models.phantoms import radiograph_phantom

    for label, name in ((False, "0_clear"), (True, "1_nodule")):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(8):
            img = radiograph_phantom(100 * int(label) + i, size=64, nodule=label).image
            png = (img.astype(np.float32) / 4095 * 255).astype(np.uint8)
            Image.fromarray(png).save(tmp_path / "img" / name / f"P{int(label)}{i}_a.png")
    data = tomllib.loads((REPO / "config/train/cxr-nodule.toml").read_text())
    data["run"]["output_dir"] = str(tmp_path / "runs")
    data["data"] = {"source": "images", "root": str(tmp_path / "img"), "val_fraction": 0.5}
    data["train"].update(epochs=1, batch_size=4, progress=False, threads=1, cam_loss_weight=0.0)
    data["eval"].update(n_boot=20, report_dir=str(tmp_path / "report"), baseline=False)
    data["export"]["package_dir"] = str(tmp_path / "pkg")
    data["manifest"]["model"]["arch_kwargs"] = {"base_width": 4}
    data["manifest"]["input"]["size"] = [64, 64]
    summary = run_training(parse_train_config(data))
    assert summary.results is not None
    assert summary.results["classification"]["n"] == 8  # half of 16 patients
    assert "validation split of images data" in summary.results["test_set"]
    assert (tmp_path / "pkg" / "model.onnx").is_file()
