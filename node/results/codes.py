"""Every coded concept the result encoders write, in one place.

Codes come from DICOM PS3.16 (DCM), SNOMED CT (SCT), UCUM and the IHE AI Results
profile (99IHE). Encoders import these names instead of spelling codes inline, so a
terminology review touches one file.
"""

from __future__ import annotations

from pydicom.sr.coding import Code

from models.result import Code as ResultCode

__all__ = [
    "ABSENT",
    "AI_FAMILY",
    "AREA",
    "DEVICE_OBSERVER",
    "IMAGE_REGION",
    "IMAGING_PROCEDURE",
    "MM2",
    "PRESENCE",
    "PRESENT",
    "PROBABILITY",
    "PROCEDURE_BY_MODALITY",
    "PROCESSING_ALGORITHM",
    "SITE_BY_BODY_PART",
    "UNITLESS",
    "to_code",
]

#: IHE AIR purpose of reference for Contributing Equipment (IHE RAD TF-3 AI Results, 6.5.3.2).
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")

#: Observer type for TID 1002 Observer Context (CID 270).
DEVICE_OBSERVER = Code("121007", "DCM", "Device")

#: Algorithm family for AlgorithmIdentification (CID 7162).
AI_FAMILY = Code("AI", "DCM", "Artificial Intelligence")

#: Probability of a finding: a TID 1500 measurement whose unit is UCUM "1" (no units).
PROBABILITY = Code("122157", "DCM", "Probability")
UNITLESS = Code("1", "UCUM", "no units")

#: Presence of the finding at the model's operating threshold (qualitative evaluation).
PRESENCE = Code("121052", "DCM", "Presence of property")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")

#: The lesion's area on its key slice (TID 1410 measurement; the outline's enclosed area).
AREA = Code("42798000", "SCT", "Area")
MM2 = Code("mm2", "UCUM", "square millimeter")

#: Concept name of a SCOORD that says where a measurement was made (TID 320, TID 1410).
IMAGE_REGION = Code("111030", "DCM", "Image Region")

#: Finding site from Body Part Examined when the model declares none (PS3.16 Annex L).
SITE_BY_BODY_PART: dict[str, Code] = {
    "CHEST": Code("51185008", "SCT", "Thoracic structure"),
    "THORAX": Code("51185008", "SCT", "Thoracic structure"),
    "LUNG": Code("39607008", "SCT", "Lung structure"),
    "ABDOMEN": Code("818981001", "SCT", "Abdomen"),
    "HEAD": Code("69536005", "SCT", "Head structure"),
    "BRAIN": Code("12738006", "SCT", "Brain structure"),
    "PELVIS": Code("816092008", "SCT", "Pelvis"),
    "LIVER": Code("10200004", "SCT", "Liver structure"),
}

#: Procedure reported (CID 100) when the source study carries no Procedure Code Sequence.
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "CT": Code("77477000", "SCT", "Computed tomography"),
    "MR": Code("113091000", "SCT", "Magnetic resonance imaging"),
    "CR": Code("168537006", "SCT", "Plain radiography"),
    "DX": Code("168537006", "SCT", "Plain radiography"),
    "MG": Code("71651007", "SCT", "Mammography"),
    "US": Code("16310003", "SCT", "Ultrasonography"),
    "PT": Code("82918005", "SCT", "Positron emission tomography"),
}


def to_code(code: ResultCode) -> Code:
    """A :class:`models.result.Code` as the pydicom ``Code`` highdicom expects."""
    return Code(code.value, code.scheme, code.meaning)
