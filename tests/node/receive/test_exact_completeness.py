"""Exact completeness at the receiver: MPPS (N-CREATE / N-SET COMPLETED) and stated counts.

``airnode receive`` runs as its own process; a pynetdicom SCU plays the modality's
MPPS side and dcmtk's storescu its storage side.  The scheduler runs in the test, so
each pass is deterministic: with ``stable_after_s`` = 600 the study is due only once
the step is COMPLETED and the last instance it lists has arrived.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]
from sqlalchemy import select

from node.config import NodeConfig, load_config
from node.ops.synthetic import ct_series, write_series
from node.schedule.scheduler import tick
from node.store.db import AuditEvent, Database, Job, JobKind, Mpps, Study, StudyState, init_db
from tests.conftest import free_port
from tests.peers import REPO, fake_packages, stop_process, storescu, wait_port, write_config

pytestmark = pytest.mark.integration


@contextmanager
def receiver(tmp: Path) -> Iterator[tuple[NodeConfig, int]]:
    port = free_port()
    path = write_config(
        tmp / "airnode.toml",
        {
            "node": {"ae_title": "AIRNODE", "port": port, "data_dir": str(tmp / "data")},
            "study": {"stable_after_s": 600.0, "force_after_s": 3600.0},
            "inference": {"backend": "fake", "model_dirs": [str(fake_packages(tmp / "pkgs"))]},
            "routes": [{"name": "ct", "model": "ct-lesion", "match": {"Modality": ["CT"]}}],
        },
    )
    init_db(load_config(path).node.resolved_database_url).dispose()  # as `airnode db upgrade`
    exe = Path(sys.executable).with_name("airnode")
    log = open(tmp / "receive.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [str(exe), "receive", "--config", str(path)], cwd=REPO, stdout=log, stderr=log
    )
    try:
        wait_port(port, timeout=30)
        yield load_config(path), port
    finally:
        stop_process(proc)
        log.close()


@contextmanager
def modality(port: int) -> Iterator[Association]:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="AIRNODE")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def in_progress(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = "PPS1"
    ds.Modality = "CT"
    step = Dataset()
    step.StudyInstanceUID = study_uid
    step.AccessionNumber = "ACC1"
    ds.ScheduledStepAttributesSequence = [step]
    ds.PerformedSeriesSequence = []
    return ds


def completed(series_uid: str, sops: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    refs = []
    for sop_class, sop in sops:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = sop
        refs.append(ref)
    series.ReferencedImageSequence = refs
    ds.PerformedSeriesSequence = [series]
    return ds


def study_and_jobs(db: Database, uid: str) -> tuple[Study, list[Job]]:
    with db.read() as s:
        row = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        jobs = list(s.scalars(select(Job).where(Job.kind == JobKind.INFER)))
    assert row is not None
    return row, jobs


def test_study_completes_when_the_last_listed_instance_arrives(tmp_path: Path) -> None:
    files = write_series(ct_series(n_slices=3, rows=32, cols=32, seed=5), tmp_path / "ct")
    heads = [dcmread(f, stop_before_pixels=True) for f in files]
    study_uid, series_uid = str(heads[0].StudyInstanceUID), str(heads[0].SeriesInstanceUID)
    sops = [(str(h.SOPClassUID), str(h.SOPInstanceUID)) for h in heads]
    pps = generate_uid()
    with receiver(tmp_path) as (cfg, port):
        db = Database(cfg.node.resolved_database_url)
        try:
            with modality(port) as assoc:
                status, _ = assoc.send_n_create(
                    in_progress(study_uid), ModalityPerformedProcedureStep, pps
                )
                assert status.Status == 0x0000
                done = storescu(port, files[:2], aet="CT1")
                assert done.returncode == 0, done.stderr
                status, _ = assoc.send_n_set(
                    completed(series_uid, sops), ModalityPerformedProcedureStep, pps
                )
                assert status.Status == 0x0000
                # A finished step may no longer be updated (PS3.4 F.7.2.2.2).
                status, _ = assoc.send_n_set(
                    completed(series_uid, sops), ModalityPerformedProcedureStep, pps
                )
                assert status.Status == 0xC310
            with db.read() as s:
                step = s.scalar(select(Mpps).where(Mpps.sop_instance_uid == pps))
            assert step is not None and step.status == "COMPLETED"
            assert step.study_instance_uid == study_uid
            assert sorted(step.referenced) == sorted(u for _, u in sops)
            assert step.calling_ae == "CT1"
            with db.read() as s:
                audit = [
                    (e.event, e.ae_title, e.detail)
                    for e in s.scalars(select(AuditEvent).where(AuditEvent.sop_instance_uid == pps))
                ]
            assert audit == [
                ("mpps-created", "CT1", "IN PROGRESS"),
                ("mpps-set", "CT1", "COMPLETED"),
            ]

            assert tick(db, cfg).due == 0  # one listed instance is still missing
            row, jobs = study_and_jobs(db, study_uid)
            assert row.state == StudyState.RECEIVING and jobs == []

            done = storescu(port, files[2:], aet="CT1")
            assert done.returncode == 0, done.stderr
            report = tick(db, cfg)
            assert report.scheduled == [study_uid]
            row, jobs = study_and_jobs(db, study_uid)
            assert row.state == StudyState.SCHEDULED and row.complete_rule == "mpps"
            assert len(jobs) == 1 and sorted(jobs[0].payload["sop_instance_uids"]) == sorted(
                u for _, u in sops
            )
        finally:
            db.dispose()


def test_bad_requests_get_their_mpps_status(tmp_path: Path) -> None:
    with receiver(tmp_path) as (cfg, port), modality(port) as assoc:
        pps = generate_uid()
        ok = in_progress(generate_uid())
        assert assoc.send_n_create(ok, ModalityPerformedProcedureStep, pps)[0].Status == 0
        # The same SOP Instance UID again: duplicate (0x0111).
        assert assoc.send_n_create(ok, ModalityPerformedProcedureStep, pps)[0].Status == 0x0111
        # No Performed Procedure Step Status: missing attribute (0x0120).
        bare = in_progress(generate_uid())
        del bare.PerformedProcedureStepStatus
        rsp = assoc.send_n_create(bare, ModalityPerformedProcedureStep, generate_uid())
        assert rsp[0].Status == 0x0120
        # A status PS3.3 does not define: invalid attribute value (0x0106).
        odd = in_progress(generate_uid())
        odd.PerformedProcedureStepStatus = "DONE"
        rsp = assoc.send_n_create(odd, ModalityPerformedProcedureStep, generate_uid())
        assert rsp[0].Status == 0x0106
        # N-SET of a step we never saw: no such SOP instance (0x0112).
        unknown = generate_uid()
        rsp = assoc.send_n_set(completed(unknown, []), ModalityPerformedProcedureStep, unknown)
        assert rsp[0].Status == 0x0112
    db = Database(cfg.node.resolved_database_url)
    try:
        with db.read() as s:
            assert [m.sop_instance_uid for m in s.scalars(select(Mpps))] == [pps]
    finally:
        db.dispose()


def test_stated_instance_count_completes_the_study_at_the_last_one(tmp_path: Path) -> None:
    """Instances that carry Number of Study Related Instances (0020,1208): the study is
    due when that many have arrived (rule ``count``), not after the quiet period."""
    series = ct_series(n_slices=3, rows=32, cols=32, seed=6)
    for ds in series:
        ds.NumberOfStudyRelatedInstances = 3
    files = write_series(series, tmp_path / "ct")
    study_uid = str(series[0].StudyInstanceUID)
    with receiver(tmp_path) as (cfg, port):
        db = Database(cfg.node.resolved_database_url)
        try:
            assert storescu(port, files[:2]).returncode == 0
            assert tick(db, cfg).due == 0
            row, _ = study_and_jobs(db, study_uid)
            assert row.expected_instances == 3 and row.instance_count == 2
            assert storescu(port, files[2:]).returncode == 0
            assert tick(db, cfg).scheduled == [study_uid]
            row, jobs = study_and_jobs(db, study_uid)
            assert row.complete_rule == "count" and len(jobs) == 1
        finally:
            db.dispose()
