"""The result object: what a model's post-processing hands to the DICOM encoders.

This is the contract between ``models/`` (which produces it) and ``node/results``
(which turns it into a TID 1500 SR, heatmap secondary captures and a SEG).  It holds
plain numbers and arrays in the *original* pixel space of the source images, and
coded concepts as :class:`Code` triples, so it needs neither torch nor highdicom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "MM3",
    "MORPHOLOGICALLY_ABNORMAL",
    "VOLUME",
    "Code",
    "Finding",
    "InferenceResult",
    "Measurement",
    "ModelIdentity",
    "Segment",
]


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 Section 8.8): value, coding scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        if not self.value or not self.scheme or not self.meaning:
            raise ValueError(f"Code needs value, scheme and meaning, got {self!r}")


#: Concepts the post-processing itself emits (label codes come from each manifest).
VOLUME = Code("118565006", "SCT", "Volume")
MM3 = Code("mm3", "UCUM", "cubic millimeter")
MORPHOLOGICALLY_ABNORMAL = Code("49755003", "SCT", "Morphologically abnormal structure")


@dataclass(frozen=True)
class Measurement:
    """A numeric measurement, e.g. lesion volume: ``name`` coded, ``unit`` as UCUM code."""

    name: Code
    value: float
    unit: Code  # UCUM, e.g. Code("mm3", "UCUM", "cubic millimeter")


@dataclass(frozen=True)
class Finding:
    """One output of a model for one study: a label with its probability.

    ``source_sop_instance_uids`` names the images the finding refers to (for a
    classification of a single image, that image; for a segmentation, the slices
    the lesion lies on). ``peak`` is the (sop_instance_uid, row, column) of the
    heatmap maximum, in original pixels, when the model gives a heatmap.
    """

    label: str
    finding_type: Code
    probability: float
    threshold: float
    finding_site: Code | None = None
    measurements: tuple[Measurement, ...] = ()
    source_sop_instance_uids: tuple[str, ...] = ()
    peak: tuple[str, int, int] | None = None
    segment_number: int | None = None  # the SEG segment that outlines this finding

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class Segment:
    """What segment *k* of a mask is (PS3.3 C.8.20.2 Segment Description)."""

    number: int
    label: str
    category: Code  # e.g. SCT 49755003 "Morphologically abnormal structure"
    property_type: Code  # e.g. SCT 52988006 "Lesion"

    def __post_init__(self) -> None:
        if self.number < 1:
            raise ValueError(f"segment numbers start at 1, got {self.number}")


@dataclass(frozen=True)
class ModelIdentity:
    """Who produced the result; flows into AlgorithmIdentification and Contributing Equipment.

    ``device_uid`` must change whenever the model (weights or version) changes.
    """

    name: str
    version: str
    device_uid: str
    manufacturer: str = "airnode"
    task: Literal["classification", "segmentation"] = "classification"


@dataclass
class InferenceResult:
    """Everything one model said about one series, in the series' own pixel space.

    ``source_sop_instance_uids`` lists the series' images in the order the arrays use
    (sorted by position for volumes).  ``heatmaps`` maps a SOP Instance UID to a
    float32 array ``(Rows, Columns)`` with values in [0, 1] (only images with a
    heatmap appear).  ``mask`` is a uint8 label array ``(n_images, Rows, Columns)``
    whose value *k* > 0 means segment *k*; ````segments[k-1]`` describes it.
    """

    model: ModelIdentity
    study_instance_uid: str
    series_instance_uid: str
    source_sop_instance_uids: list[str]
    findings: list[Finding] = field(default_factory=list)
    heatmaps: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    mask: npt.NDArray[np.uint8] | None = None
    segments: list[Segment] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    #: Out-of-distribution score of the series' model inputs against the training set
    #: (models.ood; None when the package has no reference) and whether it exceeds the
    #: package's threshold: results of such a series lie outside the model's domain.
    ood_score: float | None = None
    out_of_domain: bool = False

    def __post_init__(self) -> None:
        known = set(self.source_sop_instance_uids)
        unknown = [uid for uid in self.heatmaps if uid not in known]
        if unknown:
            raise ValueError(f"heatmaps refer to images outside the series: {unknown[:3]}")
        if self.mask is not None and self.mask.shape[0] != len(self.source_sop_instance_uids):
            raise ValueError(
                f"mask has {self.mask.shape[0]} frames for "
                f"{len(self.source_sop_instance_uids)} source images"
            )

    @property
    def positive(self) -> bool:
        return any(f.positive for f in self.findings)
