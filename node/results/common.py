"""Helpers shared by the SR, SC and SEG encoders."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code

from models.result import InferenceResult
from node.results import codes
from node.results.uids import result_uid
from node.store.jobs import key_digest

__all__ = [
    "SERIES_NUMBER",
    "STABLE_KINDS",
    "SourceIndex",
    "add_ai_equipment",
    "finding_site",
    "input_digest",
    "procedure_reported",
    "stamp",
    "uid_for",
]

#: Series numbers of the result series (PS3.3 C.7.3.1); high so they sort after the sources.
SERIES_NUMBER = {"sr": 9001, "sc": 9002, "seg": 9003, "pr": 9004}


class SourceIndex:
    """The source data sets by SOP Instance UID, checked against the result once."""

    def __init__(self, result: InferenceResult, sources: Sequence[Dataset]) -> None:
        if not sources:
            raise ValueError("sources: at least one source data set is needed")
        self.by_uid: dict[str, Dataset] = {}
        for ds in sources:
            uid = str(ds.SOPInstanceUID)
            self.by_uid[uid] = ds
            if str(ds.StudyInstanceUID) != result.study_instance_uid:
                raise ValueError("sources: a source image belongs to another study than the result")
        missing = [u for u in result.source_sop_instance_uids if u not in self.by_uid]
        if missing:
            raise ValueError(f"sources: {len(missing)} image(s) of the result are not given")
        self.ordered = [self.by_uid[u] for u in result.source_sop_instance_uids] or list(sources)
        self.first = self.ordered[0]

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
