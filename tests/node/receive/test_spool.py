"""The spool's acknowledgement contract, without a network: statuses, rows, files, recovery."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from node.ops.synthetic import ct_series
from node.receive.headers import check_uid, parse_header
from node.receive.spool import Spool, Status
from node.store.db import AuditEvent, Database, Instance, Study, StudyState
from node.store.durable import uid_path


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _store(spool: Spool, data: bytes, sop_class: str | None = None, sop_inst: str | None = None):  # type: ignore[no-untyped-def]
    fp = io.BytesIO(data)
    fp.seek(132)
    meta = pydicom.filereader._read_file_meta_info(fp)
    return spool.store(
        data,
        command_sop_class_uid=sop_class or str(meta.MediaStorageSOPClassUID),
        command_sop_instance_uid=sop_inst or str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        calling_ae="MODALITY",
        peer="127.0.0.1",
    )


@pytest.fixture
def spool(tmp_path: Path, db: Database) -> Spool:
    return Spool(tmp_path / "spool", db)


@pytest.fixture
def series() -> list[Dataset]:
    return ct_series(3, 16, 16, seed=11)


def _count(db: Database, model: type) -> int:
    with db.read() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_stored_instance_is_a_file_with_matching_hash_and_a_row(
    spool: Spool, db: Database, series: list[Dataset]
) -> None:
    data = _bytes(series[0])
    out = _store(spool, data)
    assert out.status == Status.SUCCESS and not out.duplicate
    assert out.path is not None and out.path.read_bytes() == data
    assert out.path.relative_to(spool.root) == uid_path(series[0].SOPInstanceUID)
    assert series[0].SOPInstanceUID not in str(out.path)
    with db.read() as s:
        row = s.execute(select(Instance)).scalar_one()
        study = s.execute(select(Study)).scalar_one()
        audit = s.execute(select(AuditEvent)).scalar_one()
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    assert (spool.root / row.path).read_bytes() == data
    assert (row.calling_ae, row.modality, row.size) == ("MODALITY", "CT", len(data))
    assert study.instance_count == 1 and study.state == StudyState.RECEIVING
    assert (audit.event, audit.ae_title, audit.sop_instance_uid) == (
        "received",
        "MODALITY",
        series[0].SOPInstanceUID,
    )
    assert list(spool.tmp.iterdir()) == []


def test_same_instance_twice_is_success_without_a_new_row(
    spool: Spool, db: Database, series: list[Dataset]
) -> None:
    data = _bytes(series[0])
    assert _store(spool, data).status == Status.SUCCESS
    again = _store(spool, data)
    assert again.status == Status.SUCCESS and again.duplicate
    assert _count(db, Instance) == 1
    with db.read() as s:
        assert s.execute(select(Study.instance_count)).scalar_one() == 1


def test_same_uid_different_bytes_keeps_the_first_copy(
    spool: Spool, db: Database, series: list[Dataset]
) -> None:
    first = _bytes(series[0])
    changed = series[0].copy()
    changed.SeriesDescription = "edited"
    second = _bytes(changed)
    assert _store(spool, first).status == Status.SUCCESS
    out = _store(spool, second)
    assert out.status == Status.SUCCESS and out.duplicate and "first copy kept" in out.comment
    assert out.path is not None and out.path.read_bytes() == first
    with db.read() as s:
        events = s.scalars(select(AuditEvent.event)).all()
    assert "duplicate-conflict" in events


def test_new_instance_sends_a_scheduled_study_back_to_receiving(
    spool: Spool, db: Database, series: list[Dataset]
) -> None:
    assert _store(spool, _bytes(series[0])).status == Status.SUCCESS
    with db.session() as s:
        s.execute(select(Study)).scalar_one().state = StudyState.SCHEDULED
    assert _store(spool, _bytes(series[1])).status == Status.SUCCESS
    with db.read() as s:
        study = s.execute(select(Study)).scalar_one()
    assert study.state == StudyState.RECEIVING and study.instance_count == 2


def test_uid_differing_from_the_command_is_a900(spool: Spool, series: list[Dataset]) -> None:
    out = _store(spool, _bytes(series[0]), sop_inst=series[1].SOPInstanceUID)
    assert out.status == Status.DATASET_MISMATCH and int(out.status) == 0xA900
    out = _store(spool, _bytes(series[0]), sop_class="1.2.840.10008.5.1.4.1.1.4")
    assert out.status == 0xA900


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("uid", ["../../x", "1.2." + "3" * 70, "1.2.abc", "1.02.3", "1.2.3."])
def test_non_conformant_uid_is_a900_and_writes_nothing(
    spool: Spool, series: list[Dataset], uid: str
) -> None:
    ds = series[0].copy()
    ds.SOPInstanceUID = UID(uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    out = _store(spool, _bytes(ds), sop_inst=uid)
    assert out.status == 0xA900
    assert [p for p in spool.root.rglob("*") if p.is_file()] == []
    assert check_uid(uid) is not None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_truncated_and_garbage_data_sets_are_c210(spool: Spool, series: list[Dataset]) -> None:
    data = _bytes(series[0])
    uid = series[0].SOPInstanceUID
    assert _store(spool, data[:-100], sop_inst=uid).status == 0xC210
    fp = io.BytesIO(data)
    fp.seek(132)
    pydicom.filereader._read_file_meta_info(fp)
    garbage = data[: fp.tell()] + bytes(range(256)) * 8
    assert _store(spool, garbage, sop_class=series[0].SOPClassUID, sop_inst=uid).status == 0xC210
    with pytest.raises(ValueError):
        parse_header(b"\x00" * 132)


def test_instance_over_max_instance_bytes_is_refused(
    tmp_path: Path, db: Database, series: list[Dataset]
) -> None:
    data = _bytes(series[0])
    spool = Spool(tmp_path / "spool", db, max_instance_bytes=len(data) - 1)
    out = _store(spool, data)
    assert out.status == Status.TOO_LARGE and int(out.status) == 0xC001
    assert "max_instance_bytes" in out.comment


def test_disk_below_reserve_is_a700(tmp_path: Path, db: Database, series: list[Dataset]) -> None:
    spool = Spool(tmp_path / "spool", db, min_free_bytes=2**62)
    out = _store(spool, _bytes(series[0]))
    assert out.status == Status.OUT_OF_RESOURCES and int(out.status) == 0xA700
    assert "reserve" in out.comment
    assert _count(db, Instance) == 0


def test_database_unavailable_is_a700_and_leaves_no_file(
    spool: Spool, db: Database, series: list[Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    @contextmanager
    def locked() -> Iterator[None]:
        raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))
        yield  # pragma: no cover

    monkeypatch.setattr(db, "session", locked)
    out = _store(spool, _bytes(series[0]))
    assert out.status == 0xA700 and "database" in out.comment
    assert [p for p in spool.root.rglob("*.dcm")] == []


def test_reconcile_restores_consistency_after_a_crash(
    spool: Spool, db: Database, series: list[Dataset]
) -> None:
    kept = _store(spool, _bytes(series[0]))
    gone = _store(spool, _bytes(series[1]))
    assert kept.path and gone.path
    gone.path.unlink()  # a row without a file
    orphan = spool.root / uid_path(series[2].SOPInstanceUID)  # a file without a row
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(_bytes(series[2]))
    broken = spool.root / uid_path("1.2.3.4")
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"not dicom")
    (spool.tmp / "abc.part").write_bytes(b"half")
    (spool.tmp / "p1").mkdir()
    (spool.tmp / "p1" / "tmpx.dcm").write_bytes(b"half")
    counts = spool.reconcile()
    assert counts == {"temp_removed": 2, "registered": 1, "orphans_removed": 1, "rows_removed": 1}
    with db.read() as s:
        uids = set(s.scalars(select(Instance.sop_instance_uid)))
    assert uids == {series[0].SOPInstanceUID, series[2].SOPInstanceUID}
    assert not broken.exists() and list(spool.tmp.iterdir()) == []
    assert spool.reconcile() == dict.fromkeys(counts, 0)


def test_association_guard_limits_total_and_per_host_across_processes() -> None:
    from node.receive import AssociationGuard

    shared: list[int] = [0] * (2 * 252)
    a = AssociationGuard(3, 2, counters=shared, index=0, processes=2)
    b = AssociationGuard(3, 2, counters=shared, index=1, processes=2)
    assert a.acquire("10.0.0.1") is None
    assert b.acquire("10.0.0.1") is None
    assert "one host" in (a.acquire("10.0.0.1") or "")  # per-host limit, seen across processes
    assert b.acquire("10.0.0.2") is None
    assert a.acquire("10.0.0.3") == "too many associations (limit 3)"
    b.release("10.0.0.2")
    assert a.acquire("10.0.0.3") is None
    a.reset_row(1)  # process 1 died: its slots are freed
    assert b.acquire("10.0.0.4") is None
    with pytest.raises(ValueError, match="max_per_host"):
        AssociationGuard(1, 0)
