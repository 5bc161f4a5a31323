"""STOW-RS into the spool, with ``dicomweb-client`` as the client (PS3.18 §10.5)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.config import NodeConfig
from node.ops.http import make_server
from node.ops.http.stow import CALLING_AE, FailureReason, failure_reason
from node.receive.spool import Status
from node.store.db import Database, Instance
from node.store.durable import uid_path
from tests.conftest import free_port
from tests.node.results.sources import ct_series

MAX_PART = 64 * 1024
DICOM_MP = 'multipart/related; type="application/dicom"; boundary=XyZ'


@dataclass
class Node:
    url: str
    cfg: NodeConfig
    db: Database

    @property
    def client(self) -> DICOMwebClient:
        return DICOMwebClient(f"{self.url}/dicomweb")

    def rows(self) -> list[Instance]:
        with self.db.read() as s:
            return list(s.scalars(select(Instance)))

    def spool_files(self) -> list[Path]:
        return [p for p in self.cfg.node.spool_dir.rglob("*") if p.is_file() and p.name[0] != "."]


@pytest.fixture
def node(db: Database, tmp_path: Path) -> Iterator[Node]:
    cfg = NodeConfig.model_validate(
        {
            "node": {"data_dir": str(tmp_path / "data")},
            "http": {"port": free_port(), "stow_max_request_bytes": 4 * MAX_PART},
            "security": {"min_free_bytes": 0, "max_instance_bytes": MAX_PART},
        }
    )
    server = make_server(cfg, db)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Node(f"http://127.0.0.1:{cfg.http.port}", cfg, db)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _multipart(*parts: bytes, boundary: str = "XyZ") -> bytes:
    out = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
        for p in parts
    )
    return out + b"--" + boundary.encode() + b"--\r\n"


def _uids(seq: list[Dataset]) -> list[str]:
    return sorted(str(i.ReferencedSOPInstanceUID) for i in seq)


@pytest.mark.parametrize("chunk_size", [10**6, 4096], ids=["content-length", "chunked"])
def test_a_study_stored_with_dicomweb_client_is_durable_and_indexed(
    node: Node, chunk_size: int
) -> None:
    series = ct_series(3, 32)
    study = str(series[0].StudyInstanceUID)
    client = node.client
    client.set_chunk_size(chunk_size)  # 4096: chunked transfer encoding
    rsp = client.store_instances(series, study_instance_uid=study)
    assert _uids(rsp.ReferencedSOPSequence) == sorted(str(d.SOPInstanceUID) for d in series)
    assert "FailedSOPSequence" not in rsp
    rows = node.rows()
    assert sorted(r.sop_instance_uid for r in rows) == sorted(str(d.SOPInstanceUID) for d in series)
    assert {r.calling_ae for r in rows} == {CALLING_AE}
    assert {r.study_instance_uid for r in rows} == {study}
    for ds in series:
        stored = node.cfg.node.spool_dir / uid_path(str(ds.SOPInstanceUID))
        assert pydicom.dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
    assert not list((node.cfg.node.spool_dir / "tmp").rglob("*.dcm"))  # temp files gone
    # The same instances again: duplicates are acknowledged, nothing new is stored.
    again = client.store_instances(series)
    assert len(again.ReferencedSOPSequence) == 3
    assert len(node.rows()) == 3


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"--XyZ\r\nContent-Type: application/dicom\r\n\r\nDICM...", "no close delimiter"),
        (b"no boundary here at all", "no boundary"),
        (b"--XyZ--\r\n", "no part"),
        (b"--XyZ garbage\r\n\r\nx\r\n--XyZ--", "bad boundary line"),
    ],
)
def test_malformed_multipart_is_400_and_leaves_nothing(node: Node, body: bytes, why: str) -> None:
    r = requests.post(
        f"{node.url}/dicomweb/studies", data=body, headers={"Content-Type": DICOM_MP}, timeout=10
    )
    assert r.status_code == 400, why
    assert node.rows() == [] and node.spool_files() == []


@pytest.mark.parametrize(
    "ctype",
    [
        "application/dicom",
        "application/json",
        'multipart/related; type="application/dicom+json"; boundary=XyZ',
        None,
    ],
)
def test_wrong_content_type_is_415_and_leaves_nothing(node: Node, ctype: str | None) -> None:
    (ds,) = ct_series(1, 16)
    headers = {"Content-Type": ctype} if ctype else {}
    r = requests.post(
        f"{node.url}/dicomweb/studies", data=_multipart(_bytes(ds)), headers=headers, timeout=10
    )
    assert r.status_code == 415
    assert node.rows() == [] and node.spool_files() == []


def test_a_part_of_another_type_is_415(node: Node) -> None:
    body = b"--XyZ\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\r\n--XyZ--\r\n"
    r = requests.post(
        f"{node.url}/dicomweb/studies", data=body, headers={"Content-Type": DICOM_MP}, timeout=10
    )
    assert r.status_code == 415
    assert node.rows() == [] and node.spool_files() == []


def test_oversize_part_or_request_is_413_and_leaves_nothing(node: Node) -> None:
    (small,) = ct_series(1, 64)
    (big,) = ct_series(1, 256)  # 128 KiB of pixels
    assert len(_bytes(big)) > MAX_PART
    with pytest.raises(requests.HTTPError) as err:
        node.client.store_instances([small, big])
    assert err.value.response is not None and err.value.response.status_code == 413
    assert node.rows() == [] and node.spool_files() == []
    # A body over stow_max_request_bytes is refused from its Content-Length alone.
    r = requests.post(
        f"{node.url}/dicomweb/studies",
        data=_multipart(*[_bytes(small)] * 40),
        headers={"Content-Type": DICOM_MP},
        timeout=10,
    )
    assert r.status_code == 413
    assert node.rows() == [] and node.spool_files() == []


def test_per_instance_failures_are_202_or_409_with_reasons(node: Node) -> None:
    good, other = ct_series(2, 16)
    other.StudyInstanceUID = "1.2.3.4"
    garbage = b"\0" * 128 + b"DICM" + b"\xff" * 50
    r = requests.post(
        f"{node.url}/dicomweb/studies/{good.StudyInstanceUID}",
        data=_multipart(_bytes(good), garbage, _bytes(other)),
        headers={"Content-Type": DICOM_MP},
        timeout=10,
    )
    assert r.status_code == 202
    assert r.headers["Content-Type"] == "application/dicom+json"
    rsp = Dataset.from_json(r.json())
    assert _uids(rsp.ReferencedSOPSequence) == [str(good.SOPInstanceUID)]
    reasons = {
        str(i.get("ReferencedSOPInstanceUID", "")): int(i.FailureReason)
        for i in rsp.FailedSOPSequence
    }
    assert reasons == {
        "": FailureReason.CANNOT_UNDERSTAND,
        str(other.SOPInstanceUID): FailureReason.DATASET_MISMATCH,
    }
    assert [r.sop_instance_uid for r in node.rows()] == [str(good.SOPInstanceUID)]
    # Nothing stored at all: 409.
    r = requests.post(
        f"{node.url}/dicomweb/studies",
        data=_multipart(garbage),
        headers={"Content-Type": DICOM_MP},
        timeout=10,
    )
    assert r.status_code == 409
    assert len(node.rows()) == 1


def test_other_posts_are_still_refused(node: Node) -> None:
    r = requests.post(f"{node.url}/health", data=b"x", timeout=10)
    assert r.status_code == 405
    r = requests.post(
        f"{node.url}/dicomweb/studies/../x", data=b"x", headers={"Content-Type": DICOM_MP}
    )
    assert r.status_code in (400, 405)


def test_failure_reasons_map_our_statuses() -> None:
    assert failure_reason(Status.OUT_OF_RESOURCES) == 0xA700
    assert failure_reason(Status.DATASET_MISMATCH) == 0xA900
    assert failure_reason(Status.CANNOT_UNDERSTAND) == 0xC000
    assert failure_reason(Status.TOO_LARGE) == 0xC000


def test_no_space_is_503_with_retry_after_and_nothing_stored(db: Database, tmp_path: Path) -> None:
    """Below the disk reserve every instance fails with 0xA700: the client should retry."""
    cfg = NodeConfig.model_validate(
        {
            "node": {"data_dir": str(tmp_path / "data")},
            "http": {"port": free_port()},
            "security": {"min_free_bytes": 2**62},
        }
    )
    server = make_server(cfg, db)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        (ds,) = ct_series(1, 16)
        r = requests.post(
            f"http://127.0.0.1:{cfg.http.port}/dicomweb/studies",
            data=_multipart(_bytes(ds)),
            headers={"Content-Type": DICOM_MP},
            timeout=10,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert r.status_code == 503 and r.headers["Retry-After"]
    (failed,) = Dataset.from_json(r.json()).FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert failed.FailureReason == FailureReason.OUT_OF_RESOURCES
    with db.read() as s:
        assert list(s.scalars(select(Instance))) == []
