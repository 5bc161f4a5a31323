"""Helpers shared by the SR, SC and SEG encoders."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from highdicom.valuerep import _check_specific_character_set
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code

from models.preprocess import window_from_dataset
from models.result import InferenceResult
from node.logs import uid_tag
from node.results import codes
from node.results.uids import result_uid
from node.store.jobs import key_digest

log = logging.getLogger(__name__)

__all__ = [
    "SERIES_NUMBER",
    "STABLE_KINDS",
    "SourceIndex",
    "add_ai_equipment",
    "display_window",
    "finding_site",
    "input_digest",
    "object_identity",
    "procedure_reported",
    "stamp",
    "uid_for",
]

#: Series numbers of the result series (PS3.3 C.7.3.1); high so they sort after the sources.
SERIES_NUMBER = {"sr": 9001, "sc": 9002, "seg": 9003, "pr": 9004}


#: Type 2 attributes the result objects copy from the source (Patient, General Study,
#: PS3.3 C.7.1.1 and C.7.2.1) or read from it (Patient Orientation, C.7.6.1.1.1). A lax
#: modality or a de-identifier may leave them out; they are then written empty.
TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _charset_usable(ds: Dataset) -> bool:
    """Whether highdicom writes the source's Specific Character Set as it is.

    highdicom refuses some valid forms, e.g. Korean written ``\\ISO 2022 IR 149`` with
    an empty first value (PS3.5 6.1.2.5.3).
    """
    charset = ds.get("SpecificCharacterSet")
    if not charset:
        return True
    try:
        _check_specific_character_set(charset)
    except ValueError:
        return False
    return True


def _complete(ds: Dataset) -> tuple[Dataset, list[str]]:
    """``ds`` with absent Type 2 attributes present and empty, and what was changed.

    The source is not changed: the copy shares its pixel data, only the element table
    is new. A character set highdicom cannot write is replaced by UTF-8 (ISO_IR 192):
    the text is decoded with the source's own character set first, so it stays the
    same text, re-encoded.
    """
    missing = [kw for kw in TYPE2_FROM_SOURCE if kw not in ds]
    projection = "ImageOrientationPatient" not in ds and "PatientOrientation" not in ds
    if projection:
        missing.append("PatientOrientation")
    utf8 = not _charset_usable(ds)
    if not missing and not utf8:
        return ds, []
    out = Dataset()
    for elem in ds:  # iterating decodes text with the source's character set
        out.add(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for kw in missing:
        setattr(out, kw, None)
    if utf8:
        out.SpecificCharacterSet = "ISO_IR 192"
        missing.append("SpecificCharacterSet (re-encoded as ISO_IR 192)")
    return out, missing


class SourceIndex:
    """The source data sets by SOP Instance UID, checked against the result once.

    Source headers may lack Type 2 attributes (de-identified or lax modalities); the
    index holds copies with them present and empty, so every encoder writes them empty
    as the IODs require, and logs which ones were missing (keywords only, no values).
    """

    def __init__(self, result: InferenceResult, sources: Sequence[Dataset]) -> None:
        if not sources:
            raise ValueError("sources: at least one source data set is needed")
        self.by_uid: dict[str, Dataset] = {}
        gaps: set[str] = set()
        for original in sources:
            ds, missing = _complete(original)
            gaps.update(missing)
            uid = str(ds.SOPInstanceUID)
            self.by_uid[uid] = ds
            if str(ds.StudyInstanceUID) != result.study_instance_uid:
                raise ValueError("sources: a source image belongs to another study than the result")
        missing = [u for u in result.source_sop_instance_uids if u not in self.by_uid]
        if missing:
            raise ValueError(f"sources: {len(missing)} image(s) of the result are not given")
        self.ordered = [self.by_uid[u] for u in result.source_sop_instance_uids] or list(
            self.by_uid.values()
        )
        self.first = self.ordered[0]
        if gaps:
            log.warning(
                "series %s: source header lacks Type 2 attribute(s) or has a character "
                "set the results cannot use: %s; written empty or converted",
                uid_tag(result.series_instance_uid),
                ", ".join(sorted(gaps)),
            )

    def get(self, uid: str) -> Dataset:
        try:
            return self.by_uid[uid]
        except KeyError:
            raise ValueError(f"result refers to an image not among the sources: {uid}") from None


#: Identities that stay the same across versions of a result: the result series (so a
#: corrected SR lands next to the one it replaces) and the tracking UIDs of findings and
#: segments (the same lesion keeps its identity from one version to the next).
STABLE_KINDS = frozenset(
    {"sr-series", "sc-series", "seg-series", "pr-series", "tracking", "segment"}
)


def input_digest(result: InferenceResult) -> str:
    """The digest of the exact input: the sorted source SOP Instance UIDs.

    The same digest the scheduler puts in the infer job's idempotency key
    (``node.store.jobs.key_digest``), so "same job input" and "same result objects"
    mean the same thing.
    """
    return key_digest(*sorted(result.source_sop_instance_uids))


def uid_for(result: InferenceResult, kind: str, index: int = 0) -> str:
    """The deterministic UID of one object (or series, or tracking id) of ``result``.

    Object instances (``sr``, ``seg``, ``sc``, ``pr``) also depend on the exact input;
    the kinds in :data:`STABLE_KINDS` do not.
    """
    return result_uid(
        result.study_instance_uid,
        result.series_instance_uid,
        result.model.name,
        result.model.version,
        kind,
        index,
        input_digest="" if kind in STABLE_KINDS else input_digest(result),
    )


def object_identity(result: InferenceResult, kind: str, manufacturer: str) -> dict[str, Any]:
    """The series, instance and equipment keywords a highdicom constructor takes for one
    result object of ``kind`` (``seg``, ``pr``): the same identity on every object."""
    model = result.model
    return {
        "series_instance_uid": uid_for(result, f"{kind}-series"),
        "series_number": SERIES_NUMBER[kind],
        "sop_instance_uid": uid_for(result, kind),
        "instance_number": 1,
        "manufacturer": manufacturer,
        "manufacturer_model_name": model.name[:64],
        "software_versions": model.version[:64],
        "device_serial_number": model.device_uid[-64:],
    }


def procedure_reported(source: Dataset) -> Code:
    """The imaging procedure of the source study (TID 1500 row 2, CID 100), not the algorithm.

    Prefer the study's own Procedure Code Sequence; otherwise derive it from Modality.
    """
    seq = source.get("ProcedureCodeSequence")
    if seq:
        item = seq[0]
        value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
        scheme = item.get("CodingSchemeDesignator")
        meaning = item.get("CodeMeaning")
        if value and scheme and meaning:
            return Code(str(value), str(scheme), str(meaning))
    return codes.PROCEDURE_BY_MODALITY.get(str(source.get("Modality", "")), codes.IMAGING_PROCEDURE)


def add_ai_equipment(ds: Dataset, result: InferenceResult, manufacturer: str) -> None:
    """Append the IHE AI Results Contributing Equipment item (PS3.3 C.12.1.1.5).

    highdicom only allows DCM purposes of reference, so the 99IHE "Processing
    Algorithm" item is appended after construction: manufacturer, model name,
    software version and a Device UID that changes with the model.
    """
    purpose = Dataset()
    purpose.CodeValue = codes.PROCESSING_ALGORITHM.value
    purpose.CodingSchemeDesignator = codes.PROCESSING_ALGORITHM.scheme_designator
    purpose.CodeMeaning = codes.PROCESSING_ALGORITHM.meaning
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    item.Manufacturer = result.model.manufacturer or manufacturer
    item.ManufacturerModelName = result.model.name[:64]
    item.SoftwareVersions = result.model.version[:64]
    item.DeviceUID = result.model.device_uid
    seq = list(ds.get("ContributingEquipmentSequence", []))
    seq.append(item)
    ds.ContributingEquipmentSequence = DicomSequence(seq)


def finding_site(code: Code | None, source: Dataset) -> Code | None:
    """The finding site: the model's own, else the anatomy of the source images.

    A model that detects lesions anywhere declares no site; the images then say where
    they were taken: Anatomic Region Sequence (PS3.3 C.7.6.1), else Body Part Examined
    mapped to SNOMED CT (PS3.16 Annex L). ``None`` when neither is known.
    """
    if code is not None:
        return code
    seq = source.get("AnatomicRegionSequence")
    if seq:
        item = seq[0]
        value, scheme, meaning = (
            item.get("CodeValue"),
            item.get("CodingSchemeDesignator"),
            item.get("CodeMeaning"),
        )
        if value and scheme and meaning:
            return Code(str(value), str(scheme), str(meaning))
    part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    return codes.SITE_BY_BODY_PART.get(part)


#: Date/time attributes that say when a result object was made (PS3.3 C.12.1, C.7.6.1,
#: C.8.6.1); pairs of (date keyword, time keyword).
_MADE_AT = (
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("ContentDate", "ContentTime"),
    ("SeriesDate", "SeriesTime"),
    ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ("PresentationCreationDate", "PresentationCreationTime"),
)


def stamp(ds: Dataset, made_at: datetime) -> None:
    """Set every "made at" date/time of ``ds`` to ``made_at`` (SeriesDate/Time always).

    highdicom stamps the wall clock; the worker passes the infer job's creation time
    instead, so a re-run of the same job writes byte-identical objects.
    """
    date, time = made_at.strftime("%Y%m%d"), made_at.strftime("%H%M%S")
    for date_kw, time_kw in _MADE_AT:
        if date_kw in ds or date_kw == "SeriesDate":
            setattr(ds, date_kw, date)
            setattr(ds, time_kw, time)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time


#: Display windows (centre, width in HU) by finding site for CT (lungs are black in a
#: soft-tissue window); sites are SNOMED CT codes of lung and thorax.
LUNG_WINDOW = (-600.0, 1500.0)
SOFT_TISSUE_WINDOW = (40.0, 400.0)
_LUNG_SITES = {"39607008", "51185008", "181216001", "3341006", "44029006"}


def display_window(source: Dataset, site: Code | None) -> tuple[float, float] | None:
    """The VOI window a reader wants for a finding at ``site`` on ``source``.

    CT: a lung window for lung and thorax findings, else the image's own window, else
    soft tissue. Other modalities: the image's own window (``None`` when it has none:
    the caller then uses the image's range). The heatmap SC and the presentation state
    use the same answer, so both show the finding the same way.
    """
    if str(source.get("Modality", "")) == "CT":
        if site is not None and site.value in _LUNG_SITES:
            return LUNG_WINDOW
        return window_from_dataset(source) or SOFT_TISSUE_WINDOW
    return window_from_dataset(source)
