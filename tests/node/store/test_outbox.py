"""The outbox: durable, idempotent storage and send-job creation; clean-up after delivery."""

from __future__ import annotations

from pathlib import Path

import pydicom
from sqlalchemy import func, select

from node.config import NodeConfig
from node.results import cleanup, encode_all, outbox_path, store_results
from node.store import jobs
from node.store.db import Database, Job, JobKind, JobStatus, Result
from tests.node.results.sources import ct_series, segmentation


def _objects(series: list[pydicom.Dataset] | None = None) -> list[pydicom.Dataset]:
    series = series or ct_series(n=4, size=32)
    return encode_all(segmentation(series), series, NodeConfig())


def _count(db: Database, model: type[Job] | type[Result]) -> int:
    with db.read() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_store_writes_hashed_files_rows_and_one_send_job_per_destination(
    db: Database, tmp_path: Path
) -> None:
    objects = _objects()
    rows = store_results(
        db, tmp_path, objects, model="nodule-net", infer_job_id=None, destinations=["pacs", "ris"]
    )
    assert [r.sop_instance_uid for r in rows] == [str(o.SOPInstanceUID) for o in objects]
    assert {r.kind for r in rows} == {"sr", "seg", "sc", "pr"}
    for obj, row in zip(objects, rows, strict=True):
        path = tmp_path / row.path
        assert row.path == outbox_path(str(obj.SOPInstanceUID))
        assert str(obj.SOPInstanceUID) not in row.path
        assert pydicom.dcmread(path).SOPInstanceUID == obj.SOPInstanceUID
    assert not list(tmp_path.rglob("*.tmp"))
    with db.read() as s:
        keys = set(s.scalars(select(Job.idempotency_key).where(Job.kind == JobKind.SEND)))
    assert keys == {f"send:{o.SOPInstanceUID}:{d}" for o in objects for d in ("pacs", "ris")}


def test_rerun_of_the_same_infer_job_creates_nothing_new(db: Database, tmp_path: Path) -> None:
    series = ct_series(n=4, size=32)
    first = store_results(
        db, tmp_path, _objects(series), model="m", infer_job_id=None, destinations=["pacs"]
    )
    n_jobs, n_rows = _count(db, Job), _count(db, Result)
    # The worker crashed and the infer job ran again: encoding again gives the same UIDs.
    again = store_results(
        db, tmp_path, _objects(series), model="m", infer_job_id=None, destinations=["pacs"]
    )
    assert [r.id for r in again] == [r.id for r in first]
    assert (_count(db, Job), _count(db, Result)) == (n_jobs, n_rows)


def test_cleanup_removes_files_only_when_every_destination_acknowledged(
    db: Database, tmp_path: Path
) -> None:
    rows = store_results(
        db, tmp_path, _objects(), model="m", infer_job_id=None, destinations=["a", "b"]
    )
    assert cleanup(db, tmp_path) == 0
    owner = "test"
    done_a = []
    while (job := jobs.claim(db, JobKind.SEND, owner, extra_where=[])) is not None:
        if job.payload["destination"] == "a":
            jobs.complete(db, job.id, owner)
            done_a.append(job)
        else:
            jobs.fail(db, job, owner, "0xA900: refused", jobs.RetryPolicy(), transient=False)
    assert cleanup(db, tmp_path) == 0  # "b" is dead, not acknowledged: files stay
    with db.session() as s:
        for job in s.scalars(select(Job).where(Job.status == JobStatus.DEAD)):
            job.status = JobStatus.DONE
    assert cleanup(db, tmp_path) == len(rows)
    assert all(not (tmp_path / r.path).exists() for r in rows)


def test_objects_without_destination_stay(db: Database, tmp_path: Path) -> None:
    rows = store_results(db, tmp_path, _objects(), model="m", infer_job_id=None, destinations=[])
    assert cleanup(db, tmp_path) == 0
    assert all((tmp_path / r.path).exists() for r in rows)
