"""A seeded corpus of damaged DICOM files, and a sender that delivers them unparsed.

Mutants are made from pydicom's bundled test files (native, big endian, implicit VR,
RLE, JPEG, JPEG-LS, JPEG 2000; CT, MR, NM, SC, SR, RT, SEG with nested sequences).
Each keeps its File Meta Information intact (so a C-STORE can be addressed) and gets
a SOP Instance UID of its own; its data set is then damaged in one of five ways:

- ``flip``: 1-16 random bytes of the data set replaced;
- ``truncate``: the data set cut at a random offset;
- ``length``: one element's length field set to a wrong value (0, undefined,
  a little more or less, very large);
- ``sequence``: bytes inside a sequence's value changed (item tags and lengths,
  nested VRs and lengths);
- ``stream``: bytes inside the compressed pixel stream changed (falls back to
  ``length`` for a native image).

The same ``seed`` always gives the same mutants.  The receiver test runs a few
hundred in CI; ``bench/fuzz.py`` runs many more.
"""

from __future__ import annotations

import io
import random
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.filereader import _read_file_meta_info
from pydicom.uid import UID, generate_uid

__all__ = ["KINDS", "SEEDS", "Mutant", "mutants", "send_raw"]

SEEDS = (
    "CT_small.dcm",
    "693_J2KI.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG-lossy.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "rtdose_rle_1frame.dcm",
    "rtplan.dcm",
    "reportsi.dcm",
    "liver_1frame.dcm",
)
KINDS = ("flip", "truncate", "length", "sequence", "stream")
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


@dataclass(frozen=True)
class Mutant:
    """One damaged Part 10 file and what its command will say."""

    name: str
    kind: str
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class _Element:
    tag: int
    vr: str
    value_tell: int
    length: int
    length_pos: int
    length_size: int


@dataclass(frozen=True)
class _Layout:
    start: int  # first byte of the data set
    elements: tuple[_Element, ...]
    little: bool


def _layout(data: bytes) -> _Layout:
    """Where the data set and each of its top-level elements' length fields are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = io.BytesIO(data)
        f.seek(132)
        _read_file_meta_info(f)
        start = f.tell()
        parsed = pydicom.dcmread(io.BytesIO(data))
    ts = parsed.file_meta.TransferSyntaxUID
    implicit = ts == "1.2.840.10008.1.2"
    elements = []
    for tag in parsed._dict:
        raw = parsed._dict[tag]
        vr = str(getattr(raw, "VR", None) or "UN")
        tell = getattr(raw, "value_tell", None)
        length = getattr(raw, "length", None)
        if tell is None and vr == "SQ":  # read eagerly by pydicom: find its header
            order = "<" if ts != "1.2.840.10008.1.2.2" else ">"
            head = struct.pack(f"{order}HH", tag >> 16, tag & 0xFFFF)
            pos = data.find(head if implicit else head + b"SQ", start)
            if pos < 0:
                continue
            tell = pos + 8 if implicit else pos + 12
            length = struct.unpack(f"{order}I", data[tell - 4 : tell])[0]
        if tell is None or length is None:
            continue
        size = 4 if implicit or vr in _LONG_VRS else 2
        elements.append(_Element(int(tag), vr, tell, length, tell - size, size))
    return _Layout(start, tuple(elements), ts != "1.2.840.10008.1.2.2")


def _with_uid(name: str, uid: str, study: str) -> tuple[bytes, str, str]:
    """The bundled file ``name`` re-saved with ``uid`` as its SOP Instance UID, in
    ``study`` (one series per study and source file)."""
    path = get_testdata_file(name)
    assert path is not None, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = UID(uid)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
        ds.StudyInstanceUID = UID(study)
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study, name])
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return (
        buf.getvalue(),
        str(ds.file_meta.MediaStorageSOPClassUID),
        str(ds.file_meta.TransferSyntaxUID),
    )


def _flip(rng: random.Random, b: bytearray, lo: int, hi: int, k: int) -> None:
    if hi <= lo:
        return
    for _ in range(k):
        b[rng.randrange(lo, hi)] = rng.randrange(256)


def _mutate(rng: random.Random, data: bytes, kind: str) -> tuple[str, bytes]:
    lay = _layout(data)
    b = bytearray(data)
    sq = [e for e in lay.elements if e.vr == "SQ" and e.length != 0]
    pixel = next((e for e in lay.elements if e.tag == 0x7FE00010), None)
    if kind == "stream" and pixel is not None and pixel.length == 0xFFFFFFFF:
        _flip(rng, b, pixel.value_tell + 8, len(b), rng.randint(1, 8))
        return kind, bytes(b)
    if kind == "stream":
        kind = "length"
    if kind == "sequence" and sq:
        e = rng.choice(sq)
        span = 96 if e.length == 0xFFFFFFFF else min(e.length, 96)
        _flip(rng, b, e.value_tell, min(len(b), e.value_tell + span), rng.randint(1, 6))
        return kind, bytes(b)
    if kind == "sequence":
        kind = "flip"
    if kind == "length" and lay.elements:
        e = rng.choice(lay.elements)
        fmt = ("<" if lay.little else ">") + ("I" if e.length_size == 4 else "H")
        top = 0xFFFFFFFF if e.length_size == 4 else 0xFFFF
        base = 0 if e.length == 0xFFFFFFFF else e.length
        value = rng.choice(
            [0, top, base + rng.randint(1, 8), max(0, base - rng.randint(1, 8)), rng.randrange(top)]
        )
        b[e.length_pos : e.length_pos + e.length_size] = struct.pack(fmt, min(value, top))
        return "length", bytes(b)
    if kind == "truncate":
        return kind, bytes(b[: rng.randrange(lay.start, len(b))])
    _flip(rng, b, lay.start, len(b), rng.randint(1, 16))
    return "flip", bytes(b)


def mutants(seed: int, count: int) -> Iterator[Mutant]:
    """``count`` mutants, the same for the same ``seed``."""
    rng = random.Random(seed)
    for i in range(count):
        name = SEEDS[i % len(SEEDS)]
        kind = KINDS[(i // len(SEEDS)) % len(KINDS)]
        uid = generate_uid(entropy_srcs=[str(seed), str(i)])
        # Ten mutants per study: jobs of realistic size for the worker.
        study = generate_uid(entropy_srcs=[str(seed), "study", str(i // 10)])
        clean, sop_class, ts = _with_uid(name, uid, study)
        kind, data = _mutate(rng, clean, kind)
        yield Mutant(
            name=f"{i:05d}-{name.removesuffix('.dcm')}-{kind}",
            kind=kind,
            data=data,
            sop_class_uid=sop_class,
            sop_instance_uid=uid,
            transfer_syntax_uid=ts,
        )


def send_raw(
    port: int, batch: list[Mutant], work_dir: Path, *, aet: str = "FUZZER"
) -> dict[str, int | None]:
    """C-STORE each mutant's bytes as they are (pynetdicom's chunked send: the data set
    is never parsed on our side); SOP Instance UID → status (``None``: no response)."""
    from pynetdicom import AE, _config

    work_dir.mkdir(parents=True, exist_ok=True)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    statuses: dict[str, int | None] = {}
    try:
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        pairs = sorted({(m.sop_class_uid, m.transfer_syntax_uid) for m in batch})
        for sop_class, ts in pairs:
            ae.add_requested_context(sop_class, ts)
        assoc = None
        for m in batch:
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title="AIRNODE")
                if not assoc.is_established:
                    statuses[m.sop_instance_uid] = None
                    assoc = None
                    continue
            path = work_dir / f"{m.name}.dcm"
            path.write_bytes(m.data)
            try:
                rsp = assoc.send_c_store(path)
            except Exception:
                rsp = None
            finally:
                path.unlink()
            statuses[m.sop_instance_uid] = int(rsp.Status) if rsp and "Status" in rsp else None
        if assoc is not None and assoc.is_established:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return statuses
