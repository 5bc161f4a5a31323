"""From a training config to a shipped package: data → train → export → evaluate → card.

``airnode train CONFIG`` runs :func:`run_training`; ``airnode evaluate CONFIG`` runs
:func:`evaluate_package` on an existing package.  The test set of a phantom config is
drawn from ``eval.seed``, a seed the training data never used, so it is held out by
construction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.package import Manifest, ModelPackage, ReferenceSpec, load_package
from training.config import TrainingConfig
from training.datasets import (
    ArraySet,
    ct_phantom_slices,
    dicom_folder_set,
    image_folder_set,
    patient_kfold,
    patient_split,
    radiograph_phantom_set,
    random_ct_slice_set,
    random_radiograph_set,
)
from training.evaluate import (
    evaluate_classification,
    evaluate_segmentation,
    run_baselines,
    summary_lines,
    write_report,
)

__all__ = [
    "RunSummary",
    "build_datasets",
    "build_test_set",
    "cross_validate",
    "evaluate_package",
    "run_training",
    "with_reference",
]

log = logging.getLogger(__name__)


def _load_source(cfg: TrainingConfig, n: int, seed: int) -> ArraySet:
    d = cfg.data
    spec = cfg.manifest.input
    if d.source == "phantom-radiograph":
        extra: dict[str, Any] = {}
        if d.radius_range is not None:
            extra["radius_range"] = d.radius_range
        if d.contrast_range is not None:
            extra["contrast_range"] = d.contrast_range
        return radiograph_phantom_set(n, seed, spec, native_size=d.native_size, **extra)
    if d.source == "phantom-ct":
        return ct_phantom_slices(n, seed, spec, shape=d.ct_shape)
    if d.source == "random-radiograph":
        return random_radiograph_set(n, seed, spec)
    if d.source == "random-ct":
        return random_ct_slice_set(n, seed, spec)
    if d.source == "dicom":
        assert d.root is not None and d.labels_csv is not None
        return dicom_folder_set(d.root, d.labels_csv, spec)
    assert d.root is not None
    return image_folder_set(d.root, spec)


def build_datasets(cfg: TrainingConfig) -> tuple[ArraySet, ArraySet]:
    """Training and validation sets, split by patient."""
    full = _load_source(cfg, cfg.data.n, cfg.data.seed)
    v = cfg.data.val_fraction
    train_idx, val_idx = patient_split(full.patients, (1 - v, v), seed=cfg.data.split_seed)
    return full.subset(train_idx), full.subset(val_idx)


def build_test_set(cfg: TrainingConfig, n: int | None = None, seed: int | None = None) -> ArraySet:
    """The held-out test set: phantoms from a new seed (real data: the validation split)."""
    if cfg.data.source.startswith(("phantom", "random")):
        s = cfg.eval.seed if seed is None else seed
        if s == cfg.data.seed:
            raise ValueError(f"eval.seed {s} equals data.seed: the test set would not be held out")
        return _load_source(cfg, cfg.eval.n if n is None else n, s)
    return build_datasets(cfg)[1]


def _voxel_volume(cfg: TrainingConfig) -> float | None:
    if cfg.data.source != "phantom-ct":
        return None
    from models.phantoms import ct_phantom

    spacing = ct_phantom(0, shape=(8, 16, 16), n_lesions=0).spacing
    _nz, ny, nx = cfg.data.ct_shape
    h, w = cfg.manifest.input.size
    return float(spacing[0] * spacing[1] * ny / h * spacing[2] * nx / w)


def evaluate_package(
    cfg: TrainingConfig,
    package: ModelPackage,
    *,
    train_set: ArraySet | None = None,
    test_set: ArraySet | None = None,
    out_dir: Path | None = None,
    baseline: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``package`` on the held-out set; write a report if asked.

    Inference goes through the node's own :class:`~models.pipeline.Predictor` on the
    ONNX Runtime backend (one inference path for serving and evaluation); the inputs
    were prepared by the same :meth:`~models.package.InputSpec.prepare`.
    """
    from models.backends import create_backend
    from models.pipeline import Predictor, activate

    test = test_set if test_set is not None else build_test_set(cfg)
    backend = create_backend("onnxruntime", package, intra_op_threads=cfg.train.threads)
    try:
        outputs = Predictor(package, backend, batch_size=32).run(test.images)
    finally:
        backend.close()
    results: dict[str, Any] = {
        "model": {"name": package.name, "version": package.version},
        "test_set": _describe_test(cfg, test),
    }
    y = None
    curves: dict[str, np.ndarray] = {}
    seg_examples = None
    if package.task == "classification":
        label = package.manifest.output.labels[0]
        probs = activate(outputs["logits"], package.manifest.output.activation)[:, 0]
        results["classification"] = evaluate_classification(
            probs,
            test,
            label.threshold,
            cams=outputs.get("cam"),
            n_boot=cfg.eval.n_boot,
            seed=cfg.run.seed,
        )
        y, curves = test.labels, {"CNN": probs}
        do_base = cfg.eval.baseline if baseline is None else baseline
        if do_base:
            base_train = train_set if train_set is not None else build_datasets(cfg)[0]
            base = run_baselines(base_train, test, seed=cfg.run.seed, n_boot=cfg.eval.n_boot)
            for name in ("random_forest", "svm_rbf"):
                curves[name] = base[name].pop("scores")
            results["baseline"] = base
    else:
        pred = outputs["mask_logits"].argmax(1)
        results["segmentation"] = evaluate_segmentation(pred, test, _voxel_volume(cfg))
        seg_examples = (test, pred)
    results.update(extra or {})
    if out_dir is not None:
        cams = outputs.get("cam")
        examples = (test, cams) if cams is not None else None
        write_report(
            out_dir,
            package,
            results,
            y=y,
            curves=curves,
            cam_examples=examples,
            seg_examples=seg_examples,
        )
    return results


def _describe_test(cfg: TrainingConfig, test: ArraySet) -> str:
    if cfg.data.source.startswith("random"):
        unit = "CT slices" if cfg.data.source == "random-ct" else "radiographs"
        return (
            f"{len(test)} freshly generated domain-randomised synthetic {unit} "
            f"(seed {cfg.eval.seed}; training used seed {cfg.data.seed}); the same generator "
            "family as training, so this is an internal test (see docs/evaluation/external "
            "for the independent generator)"
        )
    if cfg.data.source.startswith("phantom"):
        unit = "CT volumes" if cfg.data.source == "phantom-ct" else "radiographs"
        return (
            f"{len(set(test.groups))} freshly generated synthetic {unit} "
            f"(seed {cfg.eval.seed}; training used seed {cfg.data.seed}), {len(test)} images"
        )
    return f"validation split of {cfg.data.source} data, {len(test)} images"


def model_card(
    cfg: TrainingConfig,
    results: dict[str, Any] | None,
    history_len: int,
    external: list[str] | None = None,
) -> str:
    """The package's model card, filled from the evaluation results.

    ``external``: markdown lines on the external generator (results, known failure
    modes), written by ``bench/external_eval.py``.
    """
    m = cfg.manifest
    synthetic = cfg.data.source.startswith("phantom")
    randomised = cfg.data.source.startswith("random")
    data_text = (
        f"**Synthetic phantoms only.** {cfg.data.n} "
        + ("CT-like volumes" if cfg.data.source == "phantom-ct" else "radiograph-like images")
        + f" generated by `models.phantoms` (seed {cfg.data.seed}), split by patient "
        f"{1 - cfg.data.val_fraction:.0%}/{cfg.data.val_fraction:.0%} into training/validation."
        if synthetic
        else f"{cfg.data.source} data from {cfg.data.root}."
    )
    if randomised:
        unit = "CT slices" if cfg.data.source == "random-ct" else "chest radiographs"
        data_text = (
            f"**Synthetic phantoms only.** {cfg.data.n} domain-randomised {unit} drawn by "
            f"`training.randomised` (seed {cfg.data.seed}), split "
            f"{1 - cfg.data.val_fraction:.0%}/{cfg.data.val_fraction:.0%} into "
            "training/validation. Randomised: anatomy shape and size, intensities, noise, "
            "blur, matrix size and aspect, pixel spacing, "
            + (
                "slice thickness 1-5 mm, signed/unsigned storage; lesions 0-3 per slice, "
                "3-30 mm, lung (solid and part-solid) and solid organs (ΔHU ±10-80); "
                "distractors: vessels, ribs, spine, bowel gas, the table, metal clips."
                if cfg.data.source == "random-ct"
                else "bit depth 8-16, MONOCHROME1/2, a header VOI window or none; nodules "
                "3-30 mm at 0.1-1.0 of the lung/soft-tissue gap in half the images; "
                "distractors: ribs, clavicles, vessels (also end-on), wires, tubes, ECG "
                "electrodes."
            )
        )
    if cfg.data.source == "phantom-radiograph":
        from models.phantoms import radiograph_phantom

        defaults = radiograph_phantom.__kwdefaults__ or {}
        radius = cfg.data.radius_range or defaults["radius_range"]
        contrast = cfg.data.contrast_range or defaults["contrast_range"]
        data_text += (
            f" {cfg.data.native_size}x{cfg.data.native_size} 12-bit images, half with one "
            f"nodule of radius {radius[0]:g}-{radius[1]:g} of the image width and peak "
            f"contrast {contrast[0]:g}-{contrast[1]:g} stored units."
        )
    elif cfg.data.source == "phantom-ct":
        shape = "x".join(str(v) for v in cfg.data.ct_shape)
        data_text += (
            f" Volumes of {shape} voxels, 0-3 ellipsoid lesions each (lung and liver-like)."
        )
    if cfg.train.cam_loss_weight > 0:
        data_text += (
            f" The nodule masks fed an auxiliary CAM localisation loss "
            f"(weight {cfg.train.cam_loss_weight:g})."
        )
    labels = "\n".join(
        f'  - `{lab.name}`: {lab.code.scheme} {lab.code.value} "{lab.code.meaning}"'
        + (
            f", site {lab.finding_site.scheme} {lab.finding_site.value} "
            f'"{lab.finding_site.meaning}"'
            if lab.finding_site
            else ""
        )
        + f", threshold {lab.threshold}"
        for lab in m.output.labels
    )
    win = m.input.window
    lines = [
        f"# Model card: {m.model.name} {m.model.version}",
        "",
        "> **NOT FOR CLINICAL USE.** This model was trained and tested on synthetic "
        "phantoms generated by this project, not on patient images. Its figures say "
        "nothing about performance on real radiographs or CT.",
        "",
        "## Model",
        f"- task: {m.model.task}; architecture: `{m.model.arch}` {m.model.arch_kwargs}",
        f"- input: modalities {', '.join(m.input.modalities) or 'any'}, {m.input.channels} "
        f"channel(s), {m.input.size[0]}x{m.input.size[1]}, "
        + (
            "grey levels: first of " + ", ".join(m.input.grey_levels)
            if m.input.grey_levels
            else (f"VOI window C{win[0]:g}/W{win[1]:g}" if win else "data set's own window")
        )
        + (f" (window C{win[0]:g}/W{win[1]:g})" if win and m.input.grey_levels else "")
        + f", normalised (x - {m.input.mean}) / {m.input.std}",
        f"- outputs ({m.output.activation}):",
        labels,
        f"- device UID: {m.model.device_uid} (a new version must get a new UID)",
        "",
        "## Intended use",
        "Demonstrating and testing the airnode pipeline end to end (reception, routing, "
        "inference, DICOM SR / heatmap / SEG results, sending to a PACS) without patient data.",
        "",
        "## Must not be used for",
        "- Any diagnosis, triage, worklist prioritisation, screening or second reading of "
        "patient images: it has never seen one.",
        "- Reporting a lesion as absent: a negative output on a real image means nothing.",
        "- Measuring real lesions (volumes, sizes) or following them over time.",
        "- Input outside the manifest's declared input (the worker's guards refuse it; "
        "do not widen them without retraining and re-evaluating).",
        "",
        "## Training data",
        data_text,
        f"Config: `{cfg.run.name}` (seed {cfg.run.seed}), {history_len} epochs run "
        f"(AdamW, cosine schedule, early stopping).",
        "",
        "## Evaluation (held-out synthetic set, ONNX Runtime)",
    ]
    if results:
        lines += [results["test_set"], "", *summary_lines(results)]
    else:
        lines.append("Not evaluated.")
    lines += [
        "",
        "## Limits",
        "- Phantoms are simple geometric models (ellipses, ellipsoids, bands, noise); real "
        "anatomy, devices, pathologies, positioning and scanner variation are absent.",
        "- One finding type only; no claim about any other condition.",
        "- The figures above come from the same generator family as the training data: "
        "they measure the pipeline, not clinical accuracy.",
        "",
    ]
    if external:
        lines += ["## External evaluation (independent generator)", "", *external, ""]
    return "\n".join(lines)


def with_reference(manifest: Manifest, train_images: np.ndarray) -> Manifest:
    """The manifest with the training inputs' statistics for the out-of-distribution
    score (:mod:`models.ood`) in ``[input.reference]``."""
    from models.ood import reference_from

    ref = ReferenceSpec.model_validate(reference_from(train_images))
    return manifest.model_copy(
        update={"input": manifest.input.model_copy(update={"reference": ref})}
    )


@dataclass
class RunSummary:
    package: ModelPackage | None
    results: dict[str, Any] | None
    best_val_metric: float
    epochs: int
    steps: int


def run_training(
    cfg: TrainingConfig, *, evaluate: bool = True, report_dir: Path | None = None
) -> RunSummary:
    """Train, export the package (if configured), evaluate it and fill its model card."""
    from models.export import export_package
    from training.train import train_model

    train_set, val_set = build_datasets(cfg)
    log.info(
        "training %s: %d training / %d validation images",
        cfg.run.name,
        len(train_set),
        len(val_set),
    )
    result = train_model(cfg, train_set, val_set, run_dir=cfg.run_dir)
    package: ModelPackage | None = None
    results: dict[str, Any] | None = None
    if cfg.export.package_dir is not None:
        card = model_card(cfg, None, len(result.history))
        package = export_package(
            result.net,
            cfg.export.package_dir,
            with_reference(cfg.manifest, train_set.images),
            card,
            save_weights=True,
        )
        if evaluate:
            out = report_dir or cfg.eval.report_dir
            training = {
                "best_val_metric": result.best_metric,
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "steps": result.steps,
                "history": result.history,
            }
            results = evaluate_package(
                cfg, package, train_set=train_set, out_dir=out, extra={"training": training}
            )
            package.model_card_path.write_text(
                model_card(cfg, results, len(result.history)), encoding="utf-8"
            )
            package = load_package(package.path)
    return RunSummary(package, results, result.best_metric, len(result.history), result.steps)


def cross_validate(cfg: TrainingConfig, k: int = 5) -> dict[str, Any]:
    """Patient-level k-fold cross-validation of the configured training.

    Each fold trains a fresh net (same seed) on the other folds and scores the held-out
    fold with the validation metric (AUC, or mean Dice per case).  Nothing is exported.
    """
    from training.train import train_model

    full = _load_source(cfg, cfg.data.n, cfg.data.seed)
    scores = []
    for train_idx, val_idx in patient_kfold(full.patients, k, seed=cfg.data.split_seed):
        res = train_model(cfg, full.subset(train_idx), full.subset(val_idx))
        scores.append(float(res.best_metric))
    arr = np.asarray(scores)
    return {"k": k, "scores": scores, "mean": float(arr.mean()), "std": float(arr.std(ddof=1))}
