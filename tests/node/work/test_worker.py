"""The inference worker on a real job table and spool, with the deterministic fake backend.

Instances go in through the receiver's :class:`Spool` and jobs come from the
scheduler's :func:`tick`, so the worker sees exactly what it sees in production.  The
crash tests run the worker in its own process and ``kill -9`` it in the middle of a
job (during inference, and half-way through writing its results to the outbox).
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from sqlalchemy import select

from node.config import PRIORITY_LEVELS, NodeConfig
from node.logs import uid_tag
from node.ops.synthetic import ct_series, dx_image
from node.receive.spool import Spool, Status
from node.schedule.scheduler import tick
from node.store import jobs
from node.store.db import Database, Job, JobKind, JobStatus, Result, init_db
from node.store.outbox import outbox_path
from node.work.worker import PHASES, Worker
from tests.peers import REPO, fake_packages

SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
DESTINATIONS = ["pacs", "archive"]


def make_cfg(tmp: Path, model_dirs: list[Path] | None = None) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "node": {"data_dir": str(tmp / "data")},
            "study": {"stable_after_s": 1.0},
            "send": {"max_attempts": 25},
            "inference": {
                "backend": "fake",
                "model_dirs": [str(d) for d in (model_dirs or [fake_packages(tmp / "pkgs")])],
            },
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11113},
                {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 11114},
            ],
            "routes": [
                {
                    "name": "cxr",
                    "model": "cxr-nodule",
                    "match": {"Modality": ["DX", "CR"]},
                    "send_to": DESTINATIONS,
                },
                {
                    "name": "ct",
                    "model": "ct-lesion",
                    "match": {"Modality": ["CT"]},
                    "send_to": DESTINATIONS,
                },
            ],
        }
    )


def receive(db: Database, cfg: NodeConfig, datasets: list[Dataset]) -> None:
    """Store data sets as the receiver does (durable file + instances row)."""
    spool = Spool(cfg.node.spool_dir, db)
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out = spool.store(
            buf.getvalue(),
            command_sop_class_uid=str(ds.SOPClassUID),
            command_sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            calling_ae="SCANNER",
            peer="127.0.0.1",
        )
        assert out.status == Status.SUCCESS, out


def schedule(db: Database, cfg: NodeConfig) -> list[int]:
    report = tick(db, cfg, now=time.time() + 3600)
    assert not report.errors, report.errors
    return list(report.jobs_created)


def dx_study() -> list[Dataset]:
    return [dx_image(rows=256, cols=256, seed=3)]


def ct_study() -> list[Dataset]:
    return ct_series(n_slices=6, rows=64, cols=64, seed=4)


def job_row(db: Database, job_id: int) -> Job:
    with db.read() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def send_jobs(db: Database) -> list[Job]:
    with db.read() as s:
        return list(s.scalars(select(Job).where(Job.kind == JobKind.SEND)).all())


def results(db: Database) -> list[Result]:
    with db.read() as s:
        return list(s.scalars(select(Result)).all())


def outbox_files(cfg: NodeConfig) -> list[Path]:
    root = cfg.node.outbox_dir
    return sorted(p for p in root.rglob("*.dcm")) if root.exists() else []


# ------------------------------------------------------------------------ happy path


@pytest.mark.parametrize(
    ("study", "kinds"),
    [(dx_study, {SR: 1, SC: 1}), (ct_study, {SR: 1, SEG: 1, SC: 1})],
    ids=["dx-classification", "ct-segmentation"],
)
def test_infer_job_becomes_results_in_the_outbox_with_send_jobs(
    tmp_path: Path, study: object, kinds: dict[str, int]
) -> None:
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    source = study()  # type: ignore[operator]
    receive(db, cfg, source)
    (job_id,) = schedule(db, cfg)

    assert Worker(cfg, db).run_one() is True
    assert Worker(cfg, db).run_one() is False  # nothing left

    job = job_row(db, job_id)
    assert job.status == JobStatus.DONE, job.last_error
    rows = results(db)
    sop_classes = Counter(r.sop_class_uid for r in rows)
    for cls, n in kinds.items():
        assert sop_classes[cls] >= n, sop_classes
    assert sorted(job.payload["result_sop_instance_uids"]) == sorted(
        r.sop_instance_uid for r in rows
    )
    # Every result is a readable Part 10 file in the source study, at its hashed path.
    study_uid = str(source[0].StudyInstanceUID)
    for r in rows:
        ds = pydicom.dcmread(cfg.node.outbox_dir / r.path)
        assert r.path == outbox_path(r.sop_instance_uid)
        assert str(ds.SOPInstanceUID) == r.sop_instance_uid
        assert str(ds.StudyInstanceUID) == study_uid
        assert r.infer_job_id == job_id
    assert len(outbox_files(cfg)) == len(rows)
    # One send job per result and destination, each naming its object and destination.
    sends = send_jobs(db)
    assert sorted((j.payload["sop_instance_uid"], j.payload["destination"]) for j in sends) == (
        sorted((r.sop_instance_uid, d) for r in rows for d in DESTINATIONS)
    )
    assert all(j.status == JobStatus.QUEUED and j.parent_id == job_id for j in sends)
    # The destination and the result's UID are columns too (claims and clean-up use them).
    assert all(
        (j.result_sop_instance_uid, j.destination)
        == (j.payload["sop_instance_uid"], j.payload["destination"])
        for j in sends
    )
    assert {j.max_attempts for j in sends} == {cfg.send.max_attempts}
    db.dispose()


def test_a_stat_route_is_run_and_sent_before_earlier_routine_work(tmp_path: Path) -> None:
    """The route's priority reaches the infer job, the worker takes it first, and its
    send jobs inherit it, so the STAT result is also sent first."""
    cfg = make_cfg(tmp_path)
    routes = [
        r.model_copy(update={"priority": "stat"}) if r.name == "cxr" else r for r in cfg.routes
    ]
    cfg = cfg.model_copy(update={"routes": routes})
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, ct_study())
    (ct_job,) = schedule(db, cfg)  # routine, queued first
    receive(db, cfg, dx_study())
    (dx_job,) = schedule(db, cfg)
    assert job_row(db, ct_job).priority == PRIORITY_LEVELS["routine"]
    assert job_row(db, dx_job).priority == PRIORITY_LEVELS["stat"]

    assert Worker(cfg, db).run_one() is True
    assert job_row(db, dx_job).status == JobStatus.DONE
    assert job_row(db, ct_job).status == JobStatus.QUEUED
    assert Worker(cfg, db).run_one() is True
    by_parent = Counter((j.parent_id, j.priority) for j in send_jobs(db))
    assert {p for (parent, p) in by_parent if parent == dx_job} == {PRIORITY_LEVELS["stat"]}
    assert {p for (parent, p) in by_parent if parent == ct_job} == {PRIORITY_LEVELS["routine"]}
    first_send = jobs.claim(db, JobKind.SEND, "sender")
    assert first_send is not None and first_send.parent_id == dx_job
    db.dispose()


def test_a_header_priority_raises_a_routine_route(tmp_path: Path) -> None:
    """Requested Procedure Priority STAT (0040,1003) raises the routine route's job."""
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    study = dx_study()
    study[0].RequestedProcedurePriority = "STAT"
    receive(db, cfg, study)
    (job_id,) = schedule(db, cfg)
    assert job_row(db, job_id).priority == PRIORITY_LEVELS["stat"]
    # A value that is not mapped leaves the route's priority; a research route stays
    # research unless a header raises it.
    routes = [r.model_copy(update={"priority": "research"}) for r in cfg.routes]
    cfg2 = cfg.model_copy(update={"routes": routes})
    ct = ct_study()
    for ds in ct:
        ds.RequestedProcedurePriority = "LOW"
    receive(db, cfg2, ct)
    (ct_job,) = schedule(db, cfg2)
    assert job_row(db, ct_job).priority == PRIORITY_LEVELS["research"]
    db.dispose()


def test_timings_cover_every_phase(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, ct_study())
    (job_id,) = schedule(db, cfg)
    Worker(cfg, db).run_one()
    timings = job_row(db, job_id).payload["timings"]
    assert set(timings) == set(PHASES)
    assert all(v >= 0 for v in timings.values())
    parts = sum(v for k, v in timings.items() if k != "total")
    assert timings["total"] >= parts * 0.999  # the total spans every phase
    db.dispose()


def test_results_are_deterministic_across_databases(tmp_path: Path) -> None:
    """The same study and model give the same result UIDs: a rerun is a duplicate."""
    uids = []
    for run in ("a", "b"):
        cfg = make_cfg(tmp_path / run)
        db = init_db(cfg.node.resolved_database_url)
        receive(db, cfg, dx_study())
        schedule(db, cfg)
        Worker(cfg, db).run_one()
        uids.append(sorted(r.sop_instance_uid for r in results(db)))
        db.dispose()
    assert uids[0] and uids[0] == uids[1]


# ---------------------------------------------------------------------------- errors


def test_missing_model_ends_dead_with_a_readable_reason(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, dx_study())
    (job_id,) = schedule(db, cfg)
    # The package was removed after the job was queued.
    empty = tmp_path / "no-models"
    empty.mkdir()
    gone = cfg.model_copy(
        update={"inference": cfg.inference.model_copy(update={"model_dirs": [empty]})}
    )
    Worker(gone, db).run_one()
    job = job_row(db, job_id)
    assert job.status == JobStatus.DEAD
    assert job.last_error is not None
    assert "'cxr-nodule' is not installed" in job.last_error and str(empty) in job.last_error
    assert "\n" not in job.last_error
    assert results(db) == [] and send_jobs(db) == []
    db.dispose()


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"model_version": "9.9.9"}, "version 0.0.1, the job asked for 9.9.9"),
        # A payload that does not fit its kind is named, key by key, in one line.
        ({"sop_instance_uids": None}, "payload.sop_instance_uids: Input should be a valid list"),
        ({"model": ""}, "payload.model: String should have at least 1 character"),
    ],
    ids=["model-version-changed", "no-instances", "no-model"],
)
def test_a_job_the_worker_cannot_run_ends_dead_at_once(
    tmp_path: Path, edit: dict[str, object], reason: str
) -> None:
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, dx_study())
    (job_id,) = schedule(db, cfg)
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.payload = {**job.payload, **edit}
    Worker(cfg, db).run_one()
    job = job_row(db, job_id)
    assert job.status == JobStatus.DEAD and job.attempts == 1
    assert reason in (job.last_error or "") and "\n" not in (job.last_error or "")
    assert results(db) == [] and send_jobs(db) == []
    db.dispose()


def _corrupt(db: Database, cfg: NodeConfig, n: int | None = None) -> list[str]:
    """The disk corrupts ``n`` stored instances (all when ``None``) after acknowledgement."""
    from node.store.db import Instance

    with db.read() as s:
        victims = list(s.scalars(select(Instance).order_by(Instance.id)))[:n]
    for v in victims:
        (cfg.node.spool_dir / v.path).write_bytes(b"\x00" * 64)
    return [v.sop_instance_uid for v in victims]


def _study_note(db: Database) -> str:
    from node.store.db import Study

    with db.read() as s:
        return str(s.scalars(select(Study)).one().note or "")


def test_an_unreadable_instance_is_left_out_and_the_job_finishes(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, ct_study())
    (job_id,) = schedule(db, cfg)
    (victim,) = _corrupt(db, cfg, 1)
    Worker(cfg, db).run_one()
    job = job_row(db, job_id)
    assert job.status == JobStatus.DONE
    assert list(job.payload["unreadable"]) == [uid_tag(victim)]
    assert "1 of 6 instance(s) unreadable" in _study_note(db)
    assert victim not in _study_note(db) and victim not in str(job.payload["unreadable"])
    assert len(results(db)) >= 1
    db.dispose()


def test_nothing_readable_ends_dead_with_the_reason(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, ct_study())
    (job_id,) = schedule(db, cfg)
    victims = _corrupt(db, cfg)
    Worker(cfg, db).run_one()
    job = job_row(db, job_id)
    assert job.status == JobStatus.DEAD
    assert (job.last_error or "").startswith("PermanentJobError: no readable instance")
    assert not any(v in (job.last_error or "") for v in victims)  # no UID (PHI) in the reason
    assert job.attempts == 1  # not retried: retrying cannot help
    assert results(db) == [] and send_jobs(db) == []
    db.dispose()


def panicking_rle(study: Dataset) -> Dataset:
    """pydicom's RLE test image with damaged segments that make pylibjpeg-rle (Rust)
    panic, relabelled into ``study`` as one more DX image (found by a seeded search)."""
    import random
    import warnings

    from pydicom.data import get_testdata_file

    path = get_testdata_file("MR_small_RLE.dcm")
    assert path is not None
    raw = bytes(pydicom.dcmread(path).PixelData)
    rng = random.Random(1)
    for _ in range(200):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(16, len(b))] = rng.randrange(256)
        ds = pydicom.dcmread(path)
        ds.PixelData = bytes(b)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.pixel_array  # noqa: B018
        except Exception:
            continue
        except BaseException as exc:
            assert type(exc).__name__ == "PanicException"
            ds.StudyInstanceUID = study.StudyInstanceUID
            ds.SeriesInstanceUID = study.SeriesInstanceUID
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.Modality = "DX"
            return ds
    raise AssertionError("no panicking mutant found")


def test_a_decoder_panic_does_not_kill_the_worker(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    good = dx_study()
    bad = panicking_rle(good[0])
    receive(db, cfg, [*good, bad])
    (job_id,) = schedule(db, cfg)
    Worker(cfg, db).run_one()  # before: pyo3_runtime.PanicException ended the process
    job = job_row(db, job_id)
    assert job.status == JobStatus.DONE
    assert list(job.payload["unreadable"]) == [uid_tag(str(bad.SOPInstanceUID))]
    assert "unreadable" in _study_note(db)
    db.dispose()


def test_worker_rejects_a_bad_lease(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    with pytest.raises(ValueError, match="lease_s must be > 0"):
        Worker(cfg, db, lease_s=0)
    db.dispose()


# ------------------------------------------------------------------ kill -9, restart


def crashing_worker_main(cfg_json: str, phase: str, marker: str, recovery: str) -> None:
    """Run one job in this process, stalling at ``phase`` until killed.

    ``recovery="lease"``: a 2 s lease under a fixed owner name, left to expire.
    ``recovery="restart"``: the production owner name and lease (host:pid, 300 s).

    ``inference``: the backend never returns.  ``store``: the second result object
    reaches the outbox and the process then stalls, leaving a half-written job.
    """
    import models.backends.fake as fake
    import node.store.outbox as outbox

    cfg = NodeConfig.model_validate_json(cfg_json)
    db = init_db(cfg.node.resolved_database_url)

    def stall() -> None:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)

    if phase == "inference":
        fake.FakeBackend._run = lambda self, batch: stall()  # type: ignore[assignment,method-assign,return-value]
    else:
        from node.store.durable import write_durable as write

        count = 0

        def slow_write(target: Path, data: bytes) -> None:
            nonlocal count
            write(target, data)
            count += 1
            if count == 2:
                stall()

        # The outbox calls write_durable by the name it imported.
        pytest.MonkeyPatch().setattr(outbox, "write_durable", slow_write)
    if recovery == "lease":
        Worker(cfg, db, lease_s=2.0, owner="worker:doomed").run_one()
    else:
        Worker(cfg, db).run_one()


@pytest.mark.parametrize(
    ("phase", "recovery"),
    [("inference", "lease"), ("store", "lease"), ("store", "restart")],
)
def test_kill_9_mid_job_then_reaper_and_restart_finish_it_exactly_once(
    tmp_path: Path, phase: str, recovery: str
) -> None:
    """``lease``: the lease expires and the reaper requeues the job.  ``restart``: the
    restarted worker finds its dead predecessor's lease at start-up and requeues it at
    once, long before the 300 s lease would expire."""
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, ct_study())
    (job_id,) = schedule(db, cfg)

    # Reference: the same study on a fresh node, never interrupted.
    ref_cfg = make_cfg(tmp_path / "ref")
    ref_db = init_db(ref_cfg.node.resolved_database_url)
    receive(ref_db, ref_cfg, ct_study())
    schedule(ref_db, ref_cfg)
    Worker(ref_cfg, ref_db).run_one()
    expected = sorted(r.sop_instance_uid for r in results(ref_db))
    ref_db.dispose()
    assert len(expected) >= 2

    marker = tmp_path / "stalled"
    code = (
        "import sys; from tests.node.work.test_worker import crashing_worker_main; "
        "crashing_worker_main(*sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, cfg.model_dump_json(), phase, str(marker), recovery],
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the worker exited before it stalled"
            assert time.monotonic() < deadline, "the worker never reached the stall"
            time.sleep(0.05)
        running = job_row(db, job_id)
        owner = (
            "worker:doomed" if recovery == "lease" else f"worker:{socket.gethostname()}:{proc.pid}"
        )
        assert running.status == JobStatus.RUNNING and running.lease_owner == owner
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    # "store": killed with two files in the outbox but only the first one's row and
    # send jobs committed (the second file has no row yet).
    assert len(results(db)) == (1 if phase == "store" else 0)
    assert len(outbox_files(cfg)) == (2 if phase == "store" else 0)

    if recovery == "lease":
        # Nobody renews the lease now; once it has expired the reaper requeues the job.
        deadline = time.monotonic() + 30
        while jobs.reap_expired(db) == 0:
            assert time.monotonic() < deadline, "the dead worker's lease never expired"
            time.sleep(0.2)
    else:
        assert jobs.reap_expired(db) == 0  # the 300 s lease is still valid
        assert Worker(cfg, db).release_orphans() == 1
    reaped = job_row(db, job_id)
    assert reaped.status == JobStatus.FAILED and "expired" in (reaped.last_error or "")

    # A restarted worker finishes it.
    assert Worker(cfg, db, owner="worker:restarted").run_one() is True
    assert Worker(cfg, db).run_one() is False
    done = job_row(db, job_id)
    assert done.status == JobStatus.DONE and done.attempts == 2

    rows = results(db)
    got = sorted(r.sop_instance_uid for r in rows)
    assert got == expected  # same objects as an uninterrupted run, each once
    assert len(outbox_files(cfg)) == len(expected)
    sends = send_jobs(db)
    pairs = [(j.payload["sop_instance_uid"], j.payload["destination"]) for j in sends]
    assert len(pairs) == len(set(pairs)) == len(expected) * len(DESTINATIONS)
    assert {p[0] for p in pairs} == set(expected)
    with db.read() as s:
        infer = s.scalars(select(Job).where(Job.kind == JobKind.INFER)).all()
    assert [j.id for j in infer] == [job_id]
    db.dispose()


def test_release_orphans_leaves_live_workers_alone(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, dx_study())
    (job_id,) = schedule(db, cfg)
    live = f"worker:{socket.gethostname()}:{os.getpid()}"  # this very process
    claimed = jobs.claim(db, JobKind.INFER, live, 300.0)
    assert claimed is not None and claimed.id == job_id
    assert Worker(cfg, db).release_orphans() == 0
    job = job_row(db, job_id)
    assert job.status == JobStatus.RUNNING and job.lease_owner == live
    db.dispose()


def test_a_package_upgraded_while_the_worker_runs_is_picked_up(tmp_path: Path) -> None:
    from models.package import load_package, write_manifest

    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    worker = Worker(cfg, db)
    receive(db, cfg, dx_study())
    (first,) = schedule(db, cfg)
    worker.run_one()
    assert job_row(db, first).status == JobStatus.DONE
    # Upgrade cxr-nodule on disk; the scheduler queues the next study for 0.0.2.
    pkg_dir = cfg.inference.model_dirs[0] / "cxr-nodule"
    manifest = load_package(pkg_dir, require_onnx=False).manifest.model_dump(mode="json")
    manifest["model"]["version"] = "0.0.2"
    write_manifest(pkg_dir, manifest)
    receive(db, cfg, [dx_image(rows=128, cols=128, seed=5)])
    (second,) = schedule(db, cfg)
    assert job_row(db, second).payload["model_version"] == "0.0.2"
    worker.run_one()
    job = job_row(db, second)
    assert job.status == JobStatus.DONE, job.last_error
    assert worker.predictor("cxr-nodule", "0.0.2").package.version == "0.0.2"
    db.dispose()


# ------------------------------------------- one package rule for scheduler and worker


def two_version_cfg(tmp_path: Path, pin: str | None = None) -> NodeConfig:
    """``cxr-nodule`` 1.0.0 in the first model dir, 2.0.0 in the second."""
    old = fake_packages(tmp_path / "pkgs-a", version="1.0.0")
    new = fake_packages(tmp_path / "pkgs-b", version="2.0.0")
    cfg = make_cfg(tmp_path, model_dirs=[old, new])
    if pin is None:
        return cfg
    routes = [r.model_copy(update={"model_version": pin}) for r in cfg.routes]
    return cfg.model_copy(update={"routes": routes})


@pytest.mark.parametrize(("pin", "expected"), [(None, "2.0.0"), ("1.0.0", "1.0.0")])
def test_two_versions_in_two_model_dirs_run_end_to_end(
    tmp_path: Path, pin: str | None, expected: str
) -> None:
    """Scheduler and worker agree: the highest version wins unless the route pins one."""
    cfg = two_version_cfg(tmp_path, pin)
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, dx_study())
    (job_id,) = schedule(db, cfg)
    assert job_row(db, job_id).payload["model_version"] == expected
    worker = Worker(cfg, db)
    assert worker.run_one() is True
    job = job_row(db, job_id)
    assert job.status == JobStatus.DONE, job.last_error
    assert results(db) and send_jobs(db)
    assert worker.predictor("cxr-nodule", expected).package.version == expected
    db.dispose()


# ------------------------------------------------------------------ one worker per GPU


@pytest.mark.parametrize(
    ("visible", "devices"),
    [("0,1", [0, 1, 0, 1]), ("4,6,7", [0, 1, 2, 0]), ("3", [0, 0, 0, 0]), ("", [None] * 4)],
)
def test_each_worker_replica_runs_on_its_own_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, visible: str, devices: list[int | None]
) -> None:
    """``inference.workers = N`` on N GPUs: replica i uses GPU i (an ordinal within
    ``CUDA_VISIBLE_DEVICES``); more replicas than GPUs share them round-robin; with no
    GPU visible every worker runs on the CPU.  The fake backend records its device."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    cfg = make_cfg(tmp_path)
    db = init_db(cfg.node.resolved_database_url)
    for replica, device in enumerate(devices):
        receive(db, cfg, [dx_image(rows=64, cols=64, seed=10 + replica)])
        (job_id,) = schedule(db, cfg)
        worker = Worker.for_replica(cfg, db, replica)
        assert worker.run_one() is True
        assert job_row(db, job_id).status == JobStatus.DONE
        backend = worker.predictor("cxr-nodule", "0.0.1").backend
        assert getattr(backend, "device_index", "missing") == device
        assert backend.device == ("cpu" if device is None else f"cuda:{device}")
    db.dispose()


def test_visible_gpus_reads_cuda_visible_devices_then_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.backends import device_for_replica, visible_gpus

    for env, n in (("0,1", 2), ("", 0), ("-1", 0), ("2,-1,3", 1), (" 1 , 0 ", 2)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
        assert visible_gpus() == n, env
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    driver = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0", "0000:b1:00.0"):
        (driver / bus).mkdir(parents=True)
    assert visible_gpus(driver) == 3
    assert visible_gpus(tmp_path / "no-driver") == 0
    assert [device_for_replica(i, gpus=3) for i in range(5)] == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="replica"):
        device_for_replica(-1, gpus=1)


# ------------------------------------------------------------------ input guards

_GUARDS = (
    "body_parts",
    "photometric",
    "samples_per_pixel",
    "max_frames",
    "min_matrix",
    "pixel_spacing_mm",
    "min_field_of_view_mm",
    "slice_thickness_mm",
    "min_images",
)


def guarded_packages(root: Path) -> Path:
    """The fake packages with the shipped models' input guards (config/train/*.toml)."""
    import tomllib

    from models.package import load_package, write_manifest

    fake_packages(root)
    for name in ("cxr-nodule", "ct-lesion"):
        shipped = tomllib.loads((REPO / f"config/train/{name}.toml").read_text())["manifest"]
        data = load_package(root / name).manifest.model_dump(mode="json", exclude_none=True)
        for key in _GUARDS:
            if key in shipped["input"]:
                data["input"][key] = shipped["input"][key]
        write_manifest(root / name, data)
    return root


def _bundled(name: str) -> Dataset:
    """A pydicom test file as a new study of its own (some share UIDs)."""
    import pydicom.data
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(Path(pydicom.data.__file__).parent / "test_files" / name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "J2K_pixelrep_mismatch.dcm",
        "MR_small.dcm",
        "SC_rgb_rle.dcm",
        "JPEG2000.dcm",
        "examples_ybr_color.dcm",
    ],
)
def test_input_outside_the_model_is_not_analysed_and_the_job_says_why(
    tmp_path: Path, name: str
) -> None:
    cfg = make_cfg(tmp_path, [guarded_packages(tmp_path / "pkgs")])
    # a site that routes every series to both models: the guards must catch it
    routes = [r.model_copy(update={"match": {}}) for r in cfg.routes]
    cfg = cfg.model_copy(update={"routes": routes})
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, [_bundled(name)])
    job_ids = schedule(db, cfg)
    assert len(job_ids) == 2
    while Worker(cfg, db).run_one():
        pass
    for job_id in job_ids:
        job = job_row(db, job_id)
        assert job.status == JobStatus.DONE, job.last_error
        assert job.payload["result_sop_instance_uids"] == []
        (item,) = job.payload["not_analysed"]
        assert item["reasons"] and all(isinstance(r, str) for r in item["reasons"])
    assert results(db) == [] and outbox_files(cfg) == [] and send_jobs(db) == []
    # visible to the operator: the status page shows the reason of a done job
    from node.ops.http.page import render_status_page

    page = render_status_page(db)
    assert "not analysed: " in page
    db.dispose()


@pytest.mark.parametrize(
    ("study", "kinds"),
    [
        (lambda: [dx_image(rows=512, cols=512, seed=5, pixel_spacing=(0.7, 0.7))], {SR: 1, SC: 1}),
        (
            lambda: ct_series(
                n_slices=6,
                rows=160,
                cols=160,
                seed=6,
                pixel_spacing=(1.5, 1.5),
                slice_thickness=3.0,
            ),
            {SR: 1, SEG: 1},
        ),
    ],
    ids=["dx", "ct"],
)
def test_input_inside_the_model_is_analysed(
    tmp_path: Path, study: object, kinds: dict[str, int]
) -> None:
    cfg = make_cfg(tmp_path, [guarded_packages(tmp_path / "pkgs")])
    db = init_db(cfg.node.resolved_database_url)
    receive(db, cfg, study())  # type: ignore[operator]
    (job_id,) = schedule(db, cfg)
    assert Worker(cfg, db).run_one()
    job = job_row(db, job_id)
    assert job.status == JobStatus.DONE, job.last_error
    assert "not_analysed" not in job.payload
    got = Counter(r.sop_class_uid for r in results(db))
    assert all(got[k] >= n for k, n in kinds.items()), got
    db.dispose()
