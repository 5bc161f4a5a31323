"""Model packages: a folder with ``manifest.toml``, ``model.onnx``, a model card, engines.

Layout::

    chest-nodule/
      manifest.toml     # validated by :class:`Manifest`
      model.onnx        # exported by models.export, checked against torch
      model.pt          # optional torch state dict (torch backend, fine-tuning)
      model_card.md     # data, metrics, intended use, limits
      engines/          # TensorRT engine cache (GPU name + compute capability + TRT version)

Example ``manifest.toml``::

    [model]
    name = "chest-nodule"
    version = "1.0.0"
    device_uid = "1.2.826.0.1.3680043.8.498.1"
    task = "classification"          # or "segmentation"
    arch = "densenet121"
    arch_kwargs = { growth_rate = 16 }

    [input]
    modalities = ["CR", "DX"]
    channels = 1
    size = [224, 224]                # rows, columns
    window_center = 2048.0           # optional; the "manifest" grey-level source
    window_width = 4096.0
    grey_levels = ["header", "percentile"]  # VOI sources, first that applies wins
    percentiles = [0.5, 99.5]        # for the "percentile" source
    mean = [0.5]                     # normalisation after windowing to [0, 1]
    std = [0.25]
    # Input guards (models.guards): a series outside them is not analysed.
    body_parts = ["CHEST"]           # BodyPartExamined, where the header gives one
    photometric = ["MONOCHROME1", "MONOCHROME2"]
    samples_per_pixel = 1
    max_frames = 1                   # frames per instance
    min_matrix = [256, 256]          # rows, columns
    pixel_spacing_mm = [0.05, 1.0]   # min, max (PixelSpacing or ImagerPixelSpacing)
    min_field_of_view_mm = 200.0     # rows x spacing and columns x spacing
    slice_thickness_mm = [0.5, 6.0]  # volumes only
    min_images = 1                   # images per series

    [output]
    activation = "sigmoid"           # classification: sigmoid | softmax

    [[output.labels]]
    name = "nodule"
    code = { value = "27925004", scheme = "SCT", meaning = "Nodule" }
    threshold = 0.5
    finding_site = { value = "39607008", scheme = "SCT", meaning = "Lung structure" }

For segmentation, label *k* (1-based, in order) is class *k* of the net's output;
class 0 is background, so the net has ``len(labels) + 1`` classes.

Loading validates everything once and raises :class:`ManifestError` with one line
naming the key, e.g. ``manifest error (pkg/manifest.toml): model.device_uid: ...``.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.dataset import Dataset

from models.preprocess import GreySource, SpatialMap, preprocess_frame
from models.result import Code, ModelIdentity

__all__ = [
    "CodeSpec",
    "InputSpec",
    "LabelSpec",
    "Manifest",
    "ManifestError",
    "ModelPackage",
    "ModelSpec",
    "OutputSpec",
    "ReferenceSpec",
    "discover_packages",
    "find_packages",
    "load_package",
    "parse_manifest",
    "select_package",
    "write_manifest",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.toml"
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")  # PS3.5 9.1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ManifestError(ValueError):
    """A model package is missing a file or its manifest is invalid (one-line message)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept (SNOMED CT "SCT", RadLex "RADLEX", UCUM "UCUM", ...)."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)

    def to_code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class ModelSpec(_Strict):
    name: str
    version: str = Field(min_length=1, max_length=64)
    device_uid: str
    task: Literal["classification", "segmentation"]
    arch: str = Field(min_length=1)
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    manufacturer: str = "airnode"
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-64 of letters, digits, '.', '_', '-'")
        return v

    @field_validator("device_uid")
    @classmethod
    def _uid(cls, v: str) -> str:
        if len(v) > 64 or not _UID_RE.match(v):
            raise ValueError(f"{v!r} is not a DICOM UID (PS3.5 9.1: digits and dots, <= 64)")
        return v


class ReferenceSpec(_Strict):
    """Training-set statistics of the model input, for the out-of-distribution score
    (:mod:`models.ood`): per-feature mean and std, and the score's threshold."""

    mean: list[float]
    std: list[float]
    threshold: float = Field(gt=0)

    @model_validator(mode="after")
    def _lengths(self) -> ReferenceSpec:
        from models.ood import FEATURES

        for key in ("mean", "std"):
            if len(getattr(self, key)) != len(FEATURES):
                raise ValueError(f"{key} needs {len(FEATURES)} values ({', '.join(FEATURES)})")
        if any(v <= 0 for v in self.std):
            raise ValueError("every std must be > 0")
        return self


class InputSpec(_Strict):
    modalities: list[str] = Field(default_factory=list)
    channels: int = Field(default=1, ge=1, le=4)
    size: tuple[int, int]
    window_center: float | None = None
    window_width: float | None = Field(default=None, ge=1)
    use_dataset_window: bool = True
    grey_levels: list[GreySource] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    # Input guards, checked by models.guards.check_input before the model runs.
    body_parts: list[str] = Field(default_factory=list)
    photometric: list[str] = Field(default_factory=list)
    samples_per_pixel: int | None = Field(default=None, ge=1, le=4)
    max_frames: int | None = Field(default=None, ge=1)
    min_matrix: tuple[int, int] | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    min_field_of_view_mm: float | None = Field(default=None, gt=0)
    slice_thickness_mm: tuple[float, float] | None = None
    min_images: int = Field(default=1, ge=1)
    reference: ReferenceSpec | None = None

    @field_validator("size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8 or max(v) > 4096:
            raise ValueError("rows and columns must be in 8..4096")
        return v

    @field_validator("std")
    @classmethod
    def _std(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("window_center and window_width go together")
        for key in ("mean", "std"):
            n = len(getattr(self, key))
            if n not in (1, self.channels):
                raise ValueError(f"{key} needs 1 or {self.channels} values, got {n}")
        if self.grey_levels is not None:
            if not self.grey_levels:
                raise ValueError("grey_levels needs at least one source")
            if "manifest" in self.grey_levels and self.window is None:
                raise ValueError("grey_levels 'manifest' needs window_center and window_width")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        for key in ("pixel_spacing_mm", "slice_thickness_mm"):
            rng = getattr(self, key)
            if rng is not None and not 0.0 < rng[0] <= rng[1]:
                raise ValueError(f"{key} must be [min, max] with 0 < min <= max")
        return self

    def prepare(
        self, frame: npt.NDArray[np.generic], ds: Dataset
    ) -> tuple[npt.NDArray[np.float32], SpatialMap]:
        """One decoded frame → this model's input, exactly as training and serving see it."""
        return preprocess_frame(
            frame,
            ds,
            self.size,
            self.channels,
            self.window,
            self.use_dataset_window,
            self.mean,
            self.std,
            sources=self.grey_levels,
            percentiles=self.percentiles,
        )

    @property
    def window(self) -> tuple[float, float] | None:
        if self.window_center is None or self.window_width is None:
            return None
        return self.window_center, self.window_width


class LabelSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    code: CodeSpec
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    finding_site: CodeSpec | None = None
    units: CodeSpec | None = None


class OutputSpec(_Strict):
    activation: Literal["sigmoid", "softmax"] = "sigmoid"
    labels: list[LabelSpec] = Field(min_length=1)

    @field_validator("labels")
    @classmethod
    def _unique(cls, v: list[LabelSpec]) -> list[LabelSpec]:
        names = [lab.name for lab in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate label names: {dupes}")
        return v


class Manifest(_Strict):
    model: ModelSpec
    input: InputSpec
    output: OutputSpec

    @property
    def num_classes(self) -> int:
        """Channels of the net's output: labels, plus background for segmentation."""
        n = len(self.output.labels)
        return n + 1 if self.model.task == "segmentation" else n

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("mask_logits",) if self.model.task == "segmentation" else ("logits", "cam")


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(root)"
    return f"{loc}: {err['msg']}"


def parse_manifest(data: dict[str, Any], source: str = "manifest") -> Manifest:
    """Validate a manifest mapping; :class:`ManifestError` names the first bad key."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"manifest error ({source}): {_format_error(exc)}") from None


@dataclass(frozen=True)
class ModelPackage:
    """A validated model package on disk."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.model.name

    @property
    def version(self) -> str:
        return self.manifest.model.version

    @property
    def task(self) -> Literal["classification", "segmentation"]:
        return self.manifest.model.task

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def torch_weights_path(self) -> Path:
        return self.path / "model.pt"

    @property
    def model_card_path(self) -> Path:
        return self.path / "model_card.md"

    @property
    def engines_dir(self) -> Path:
        return self.path / "engines"

    @property
    def identity(self) -> ModelIdentity:
        m = self.manifest.model
        return ModelIdentity(m.name, m.version, m.device_uid, m.manufacturer, m.task)


def load_package(path: str | Path, require_onnx: bool = True) -> ModelPackage:
    """Read and validate a package folder; raises :class:`ManifestError` (one line)."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ManifestError(f"manifest error ({root}): no {MANIFEST} in the package folder")
    try:
        data = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ManifestError(f"manifest error ({manifest_path}): {exc}") from None
    manifest = parse_manifest(data, str(manifest_path))
    if require_onnx and not (root / "model.onnx").is_file():
        raise ManifestError(f"manifest error ({root}): model.onnx is missing; export the model")
    return ModelPackage(root, manifest)


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+]", version))


def discover_packages(
    dirs: Sequence[Path | str],
) -> dict[str, dict[str, ModelPackage]]:
    """Every valid package in ``dirs`` (each a package or a folder of packages).

    Returns model name → version → package.  This is the one place that reads the
    model dirs: the scheduler (which version a job asks for) and the worker (which
    package it loads) both call it, so they cannot disagree.  Invalid packages are
    logged and skipped so that one bad folder does not stop a stage.  The same name
    and version in two dirs is one package: the earlier dir's copy is kept.
    """
    found: dict[str, dict[str, ModelPackage]] = {}
    for d in dirs:
        base = Path(d)
        if not base.is_dir():
            log.warning("model directory %s does not exist", base)
            continue
        candidates = (
            [base]
            if (base / MANIFEST).is_file()
            else sorted(p for p in base.iterdir() if p.is_dir())
        )
        for cand in candidates:
            if not (cand / MANIFEST).is_file():
                continue
            try:
                pkg = load_package(cand)
            except ManifestError as exc:
                log.warning("skipping model package: %s", exc)
                continue
            versions = found.setdefault(pkg.name, {})
            if pkg.version in versions:
                log.warning(
                    "model %s %s is in %s and %s; using the first",
                    pkg.name,
                    pkg.version,
                    versions[pkg.version].path,
                    pkg.path,
                )
                continue
            versions[pkg.version] = pkg
    return found


def select_package(
    versions: Mapping[str, ModelPackage], version: str | None = None
) -> ModelPackage | None:
    """The package to run: ``version`` when given (a route's pin), else the highest.

    Versions compare part by part, numerically where a part is a number
    (``1.10.0`` > ``1.9.2``); ``None`` when no package fits.
    """
    if version is not None:
        return versions.get(version)
    if not versions:
        return None
    return versions[max(versions, key=_version_key)]


def find_packages(dirs: Sequence[Path | str]) -> dict[str, ModelPackage]:
    """Model name → the package that runs when no version is pinned (the highest)."""
    out: dict[str, ModelPackage] = {}
    for name, versions in discover_packages(dirs).items():
        pkg = select_package(versions)
        if pkg is not None:
            out[name] = pkg
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_manifest(path: str | Path, manifest: Manifest | dict[str, Any]) -> Path:
    """Validate ``manifest`` and write it as ``manifest.toml`` into folder ``path``.

    Creates the folder and its ``engines/`` cache.  Returns the manifest file path.
    """
    m = manifest if isinstance(manifest, Manifest) else parse_manifest(manifest)
    data = m.model_dump(mode="json", exclude_none=True)
    lines: list[str] = []
    for section in ("model", "input"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in data[section].items() if k != "reference"]
        lines.append("")
    if "reference" in data["input"]:
        lines.append("[input.reference]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in data["input"]["reference"].items()]
        lines.append("")
    lines += ["[output]", f"activation = {_toml_value(data['output']['activation'])}", ""]
    for label in data["output"]["labels"]:
        lines.append("[[output.labels]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in label.items()]
        lines.append("")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "engines").mkdir(exist_ok=True)
    out = root / MANIFEST
    out.write_text("\n".join(lines), encoding="utf-8")
    parse_manifest(tomllib.loads(out.read_text(encoding="utf-8")), str(out))  # round-trip
    return out
