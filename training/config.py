"""Typed training configuration (TOML), validated once before any work starts.

A file has five tables::

    [run]       name, seed, output_dir (checkpoints, CSV log), device ("auto"|"cpu"|"cuda")
    [data]      source = "phantom-radiograph" | "phantom-ct" | "dicom" | "images", its
                parameters, and the patient-level validation share
    [train]     epochs, batch_size, lr, weight_decay, patience, augmentation, threads...
    [eval]      the held-out test set (phantoms: a new seed), bootstrap, report folder
    [manifest]  the model package manifest (model, input, output; see models.package)
                and [export] package_dir: where `airnode train` writes the package

A bad file raises :class:`TrainConfigError` with one line naming the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.package import Manifest

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ExportConfig",
    "RunConfig",
    "TrainConfig",
    "TrainConfigError",
    "TrainingConfig",
    "load_train_config",
]


class TrainConfigError(ValueError):
    """The training configuration is missing or invalid (one-line message)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Strict):
    name: str = Field(min_length=1)
    seed: int = Field(default=0, ge=0)
    output_dir: Path = Path("runs")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class DataConfig(_Strict):
    source: Literal[
        "phantom-radiograph", "phantom-ct", "random-radiograph", "random-ct", "dicom", "images"
    ]
    n: int = Field(default=1000, ge=4, description="phantom images (or CT volumes)")
    seed: int = Field(default=1, ge=0)
    native_size: int = Field(default=256, ge=32, description="radiograph phantom size")
    ct_shape: tuple[int, int, int] = (24, 128, 128)
    radius_range: tuple[float, float] | None = None
    contrast_range: tuple[float, float] | None = None
    root: Path | None = None
    labels_csv: Path | None = None
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _paths(self) -> DataConfig:
        if self.source in ("dicom", "images") and self.root is None:
            raise ValueError(f"data.root is required for source {self.source!r}")
        if self.source == "dicom" and self.labels_csv is None:
            raise ValueError("data.labels_csv is required for source 'dicom'")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    patience: int = Field(default=5, ge=1, description="epochs without improvement")
    augment: bool = True
    hflip: bool = True
    vflip: bool = False
    max_rotate_deg: float = Field(default=5.0, ge=0, le=45)
    max_scale: float = Field(default=0.05, ge=0, le=0.5)
    max_shift: float = Field(default=0.05, ge=0, le=0.5)
    intensity_jitter: float = Field(default=0.1, ge=0, le=1)
    class_weighting: bool = True
    cam_loss_weight: float = Field(
        default=0.0, ge=0, description="auxiliary CAM localisation loss (needs masks)"
    )
    amp: bool = True
    threads: int = Field(default=2, ge=1)
    resume: bool = False
    progress: bool = True
    max_steps: int | None = Field(default=None, ge=1, description="stop early (tests)")


class EvalConfig(_Strict):
    n: int = Field(default=400, ge=2)
    seed: int = Field(default=999, ge=0)
    n_boot: int = Field(default=1000, ge=10)
    report_dir: Path | None = None
    baseline: bool = True


class ExportConfig(_Strict):
    package_dir: Path | None = None


class TrainingConfig(_Strict):
    run: RunConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    manifest: Manifest

    @model_validator(mode="after")
    def _task_matches(self) -> TrainingConfig:
        if self.data.source in ("phantom-ct", "random-ct") and (
            self.manifest.model.task != "segmentation"
        ):
            raise ValueError(
                f"data.source {self.data.source!r} trains segmentation; set model.task"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return self.run.output_dir / self.run.name


def parse_train_config(data: dict[str, Any], source: str = "config") -> TrainingConfig:
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise TrainConfigError(f"config error ({source}): {loc}: {err['msg']}") from None


def load_train_config(path: str | Path, base_dir: Path | None = None) -> TrainingConfig:
    """Read a TOML training config.  Relative paths stay relative to the working directory."""
    p = Path(path)
    if not p.is_file():
        raise TrainConfigError(f"config error: {p} does not exist")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TrainConfigError(f"config error ({p}): {exc}") from None
    return parse_train_config(data, str(p))
