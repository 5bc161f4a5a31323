"""``airnode train``, ``evaluate``, ``export`` and ``crossval``.

:func:`register` adds the commands to the node's typer app; torch and scikit-learn
are imported only when a command runs.  Errors a user can meet (bad config, missing
package) end in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from models.package import ModelPackage
    from training.config import TrainingConfig

__all__ = ["CliError", "register"]


class CliError(Exception):
    """A training command's error that the CLI prints as one line (exit status 2)."""


def _fail(message: str) -> NoReturn:
    """End with one line ``airnode: ...`` and exit status 2 (the node CLI's user error)."""
    raise CliError(message)


def _config(path: Path) -> TrainingConfig:
    from training.config import TrainConfigError, load_train_config

    try:
        return load_train_config(path)
    except TrainConfigError as exc:
        _fail(str(exc))


def train(
    config: Annotated[
        Path, typer.Argument(help="Training config (TOML), e.g. config/train/cxr-nodule.toml.")
    ],
    resume: Annotated[bool, typer.Option(help="Continue from the run's last checkpoint.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    evaluate: Annotated[bool, typer.Option(help="Evaluate the exported package.")] = True,
) -> None:
    """Train the configured net, export the model package, evaluate it and write its card."""
    cfg = _config(config)
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"resume": resume, "progress": progress})}
    )
    from training.pipeline import run_training

    summary = run_training(cfg, evaluate=evaluate)
    typer.echo(
        f"{cfg.run.name}: {summary.epochs} epochs, {summary.steps} steps, "
        f"best validation metric {summary.best_val_metric:.4f}"
    )
    if summary.package is not None:
        typer.echo(f"package written to {summary.package.path}")
    if summary.results is not None:
        _echo_headline(summary.results)


def evaluate(
    config: Annotated[Path, typer.Argument(help="The training config the package came from.")],
    package: Annotated[
        Path | None, typer.Option(help="Package folder (default: the config's export.package_dir).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default: eval.report_dir).")
    ] = None,
    n: Annotated[int | None, typer.Option(help="Test images (phantom CT: volumes).")] = None,
    seed: Annotated[int | None, typer.Option(help="Test-set seed (phantoms).")] = None,
    baseline: Annotated[bool, typer.Option(help="Also fit the classical baselines.")] = True,
) -> None:
    """Evaluate a model package through ONNX Runtime on the held-out set; write JSON + Markdown."""
    cfg = _config(config)
    from models.package import ManifestError, load_package
    from training.pipeline import build_test_set, evaluate_package

    pkg_dir = package or cfg.export.package_dir
    if pkg_dir is None:
        _fail("no package: pass --package or set export.package_dir in the config")
    try:
        pkg = load_package(pkg_dir)
    except ManifestError as exc:
        _fail(str(exc))
    test = build_test_set(cfg, n=n, seed=seed)
    out_dir = out or cfg.eval.report_dir
    results = evaluate_package(
        cfg,
        pkg,
        test_set=test,
        out_dir=out_dir,
        baseline=baseline,
        extra=_training_record(out_dir, pkg),
    )
    _echo_headline(results)


def _training_record(out_dir: Path | None, pkg: ModelPackage) -> dict[str, object]:
    """Keep the training history of a report being rewritten for the same package."""
    if out_dir is None or not (out_dir / "results.json").is_file():
        return {}
    try:
        prev = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    same = prev.get("model") == {"name": pkg.name, "version": pkg.version}
    return {"training": prev["training"]} if same and "training" in prev else {}


def export(
    config: Annotated[Path, typer.Argument(help="The training config.")],
    checkpoint: Annotated[Path, typer.Option(help="A state dict (best.pt) from a training run.")],
    package: Annotated[Path | None, typer.Option(help="Package folder.")] = None,
) -> None:
    """Export a checkpoint to a model package (ONNX verified against torch, manifest, card)."""
    cfg = _config(config)
    import torch

    from models.export import export_package
    from training.pipeline import model_card
    from training.train import build_model

    target = package or cfg.export.package_dir
    if target is None:
        _fail("no package folder: pass --package or set export.package_dir in the config")
    if not checkpoint.is_file():
        _fail(f"checkpoint {checkpoint} does not exist")
    net = build_model(cfg)
    net.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    pkg = export_package(net, target, cfg.manifest, model_card(cfg, None, 0), save_weights=True)
    typer.echo(f"package written to {pkg.path}")


def crossval(
    config: Annotated[Path, typer.Argument(help="Training config (TOML).")],
    folds: Annotated[int, typer.Option(help="Number of patient-level folds.")] = 5,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Patient-level k-fold cross-validation: the validation metric per fold, mean and SD."""
    cfg = _config(config)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": progress})})
    from training.pipeline import cross_validate

    try:
        result = cross_validate(cfg, folds)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result, indent=2))


def _echo_headline(results: dict[str, object]) -> None:
    keep = {}
    cls = results.get("classification")
    if isinstance(cls, dict):
        keep["auc"] = cls["auc"]
        keep["auc_ci95"] = cls["auc_ci95"]
        keep["cam_localisation"] = cls.get("cam_localisation")
    seg = results.get("segmentation")
    if isinstance(seg, dict):
        keep["dice_mean"] = seg["dice_mean"]
        keep["iou_mean"] = seg["iou_mean"]
    base = results.get("baseline")
    if isinstance(base, dict):
        keep["baseline_auc"] = {k: base[k]["auc"] for k in ("random_forest", "svm_rbf")}
    typer.echo(json.dumps(keep, indent=2, default=float))


def register(app: typer.Typer) -> None:
    """Add the training commands to the ``airnode`` CLI."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("export")(export)
    app.command("crossval")(crossval)
