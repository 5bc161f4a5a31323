"""The scheduler: study completeness, routing per series, idempotent infer jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from node.config import NodeConfig, parse_config
from node.schedule import scheduler
from node.schedule.routing import Router
from node.schedule.scheduler import TickReport, infer_key, installed_packages, tick
from node.store import jobs
from node.store.db import Database, Instance, Job, JobKind, JobStatus, Study, StudyState, init_db
from tests.models.helpers import manifest, write_package_dir
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
T0 = 1_000_000.0
STABLE = 60.0
FORCE = 600.0


def write_package(root: Path, folder: str, name: str, version: str) -> Path:
    """A valid package (manifest and a placeholder model.onnx) named ``name`` ``version``."""
    data = manifest()
    data["model"].update(name=name, version=version)
    return write_package_dir(root / folder, data)


def make_cfg(
    tmp_path: Path, routes: list[dict[str, Any]] | None = None, **study: Any
) -> NodeConfig:
    models = tmp_path / "models"
    if not models.exists():
        write_package(models, "cxr", "cxr-nodule", "1.0.0")
        write_package(models, "ct", "ct-lesion", "2.1")
    if routes is None:
        routes = [
            {"name": "cxr", "model": "cxr-nodule", "match": {"Modality": ["DX", "CR"]}},
            {"name": "ct", "model": "ct-lesion", "match": {"Modality": ["CT"]}},
        ]
    return parse_config(
        {
            "node": {"data_dir": str(tmp_path / "data")},
            "study": {"stable_after_s": STABLE, "force_after_s": FORCE, **study},
            "inference": {"model_dirs": [str(models)]},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                {"name": "research", "ae_title": "RES", "host": "127.0.0.1", "port": 105},
            ],
            "routes": routes,
        }
    )


class Feed:
    """Does what the receiver does: a file in the spool, an instances row, the study row."""

    def __init__(self, db: Database, cfg: NodeConfig) -> None:
        self.db = db
        self.spool = cfg.node.spool_dir
        self.spool.mkdir(parents=True, exist_ok=True)

    def add(
        self,
        study: str,
        series: str,
        t: float,
        modality: str = "CT",
        sop_class: str = CT,
        calling_ae: str = "SCANNER",
        write_file: bool = True,
        **attrs: Any,
    ) -> str:
        sop = generate_uid()
        rel = f"{sop}.dcm"
        if write_file:
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = sop
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.Modality = modality
            for k, v in attrs.items():
                setattr(ds, k, v)
            ds.save_as(self.spool / rel, enforce_file_format=True)
        else:
            (self.spool / rel).write_bytes(b"not dicom at all")
        with self.db.session() as s:
            s.add(
                Instance(
                    sop_instance_uid=sop,
                    sop_class_uid=sop_class,
                    study_instance_uid=study,
                    series_instance_uid=series,
                    modality=modality,
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    path=rel,
                    sha256="0" * 64,
                    size=1,
                    calling_ae=calling_ae,
                    received_at=t,
                )
            )
            row = s.scalar(select(Study).where(Study.study_instance_uid == study))
            if row is None:
                s.add(
                    Study(
                        study_instance_uid=study,
                        first_received_at=t,
                        last_received_at=t,
                        state=StudyState.RECEIVING,
                        instance_count=1,
                    )
                )
            else:
                row.last_received_at = t
                row.instance_count += 1
                row.state = StudyState.RECEIVING
        return sop

    def series(self, study: str, n: int, t: float, **kw: Any) -> tuple[str, list[str]]:
        series = generate_uid()
        return series, [self.add(study, series, t + i * 0.01, **kw) for i in range(n)]


def infer_jobs(db: Database) -> list[Job]:
    with db.read() as s:
        return list(s.scalars(select(Job).where(Job.kind == JobKind.INFER).order_by(Job.id)))


def study_row(db: Database, uid: str) -> Study:
    with db.read() as s:
        row = s.scalar(select(Study).where(Study.study_instance_uid == uid))
    assert row is not None
    return row


@pytest.fixture
def cfg(tmp_path: Path) -> NodeConfig:
    return make_cfg(tmp_path)


@pytest.fixture
def feed(db: Database, cfg: NodeConfig) -> Feed:
    return Feed(db, cfg)


def test_study_waits_until_stable_then_gets_one_job_per_model(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    study = generate_uid()
    ct_series, ct_sops = feed.series(study, 5, T0, Rows=512, Columns=512)
    dx_series, dx_sops = feed.series(study, 1, T0, modality="DX", sop_class=DX)

    early = tick(db, cfg, now=T0 + STABLE - 1)
    assert early.due == 0 and infer_jobs(db) == []
    assert study_row(db, study).state == StudyState.RECEIVING

    report = tick(db, cfg, now=T0 + STABLE + 1)
    assert report.scheduled == [study]
    rows = infer_jobs(db)
    assert len(rows) == 2 and sorted(report.jobs_created) == [j.id for j in rows]
    by_model = {j.payload["model"]: j for j in rows}
    ct = by_model["ct-lesion"].payload
    assert ct["model_version"] == "2.1"
    assert ct["study_instance_uid"] == study
    assert ct["series_instance_uids"] == [ct_series]
    assert ct["sop_instance_uids"] == sorted(ct_sops)
    assert ct["route"] == "ct"
    assert ct["destinations"] == []
    dx = by_model["cxr-nodule"].payload
    assert dx["model_version"] == "1.0.0"
    assert dx["series_instance_uids"] == [dx_series]
    assert dx["sop_instance_uids"] == dx_sops
    assert all(j.status == JobStatus.QUEUED and j.study_instance_uid == study for j in rows)
    row = study_row(db, study)
    assert row.state == StudyState.SCHEDULED
    assert row.note is not None and "ct-lesion@2.1" in row.note and "cxr-nodule@1.0.0" in row.note


def test_ticking_again_never_duplicates(db: Database, cfg: NodeConfig, feed: Feed) -> None:
    study = generate_uid()
    feed.series(study, 3, T0)
    first = tick(db, cfg, now=T0 + STABLE + 1)
    assert len(first.jobs_created) == 1
    for k in range(3):
        again = tick(db, cfg, now=T0 + STABLE + 2 + k * 1000)
        assert again.jobs_created == []
    # Even if the study were put back to receiving with the same input.
    with db.session() as s:
        row = s.scalar(select(Study).where(Study.study_instance_uid == study))
        assert row is not None
        row.state = StudyState.RECEIVING
    again = tick(db, cfg, now=T0 + 5000)
    assert again.jobs_created == [] and again.jobs_existing == first.jobs_created
    assert len(infer_jobs(db)) == 1


def test_late_series_reruns_only_the_model_whose_input_changed(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    study = generate_uid()
    feed.series(study, 2, T0)
    feed.series(study, 1, T0, modality="DX", sop_class=DX)
    tick(db, cfg, now=T0 + STABLE + 1)
    before = {j.payload["model"]: j.id for j in infer_jobs(db)}

    late_t = T0 + 3600
    late_series, late_sops = feed.series(study, 2, late_t)
    assert tick(db, cfg, now=late_t + 1).jobs_created == []  # not quiet yet
    report = tick(db, cfg, now=late_t + STABLE + 1)
    assert report.scheduled == [study]
    assert len(report.jobs_created) == 1
    assert report.jobs_existing == [before["cxr-nodule"]]
    new = next(j for j in infer_jobs(db) if j.id == report.jobs_created[0])
    assert new.payload["model"] == "ct-lesion"
    assert late_series in new.payload["series_instance_uids"]
    assert set(late_sops) <= set(new.payload["sop_instance_uids"])
    assert len(new.payload["sop_instance_uids"]) == 4  # the whole CT input, old and new
    assert len(infer_jobs(db)) == 3


def test_late_series_found_even_if_study_stayed_scheduled(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    study = generate_uid()
    feed.series(study, 1, T0)
    tick(db, cfg, now=T0 + STABLE + 1)
    late_t = T0 + 1000
    feed.series(study, 1, late_t)
    with db.session() as s:  # a receiver that does not reopen the study
        row = s.scalar(select(Study).where(Study.study_instance_uid == study))
        assert row is not None
        row.state = StudyState.SCHEDULED
    assert tick(db, cfg, now=late_t + 1).due == 0
    report = tick(db, cfg, now=late_t + STABLE + 1)
    assert len(report.jobs_created) == 1
    assert len(infer_jobs(db)) == 2


def test_study_matching_no_route_is_unrouted_without_job(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    study = generate_uid()
    feed.series(study, 2, T0, modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4")
    report = tick(db, cfg, now=T0 + STABLE + 1)
    assert report.unrouted == [study]
    assert infer_jobs(db) == []
    row = study_row(db, study)
    assert row.state == StudyState.UNROUTED
    assert row.note is not None and "no route matched" in row.note
    assert tick(db, cfg, now=T0 + 10 * STABLE).due == 0


def test_unknown_model_is_noted_and_gets_no_job(tmp_path: Path, db: Database) -> None:
    cfg = make_cfg(
        tmp_path,
        routes=[
            {"name": "ct", "model": "ct-lesion", "match": {"Modality": "CT"}},
            {"name": "typo", "model": "ct-lesoin", "match": {"Modality": "CT"}},
        ],
    )
    feed = Feed(db, cfg)
    study = generate_uid()
    feed.series(study, 1, T0)
    report = tick(db, cfg, now=T0 + STABLE + 1)
    assert [j.payload["model"] for j in infer_jobs(db)] == ["ct-lesion"]
    assert len(report.errors) == 1 and "ct-lesoin" in report.errors[0]
    note = study_row(db, study).note
    assert note is not None and "unknown model 'ct-lesoin'" in note and "route typo" in note


def test_only_unknown_models_leaves_study_unrouted(tmp_path: Path, db: Database) -> None:
    cfg = make_cfg(tmp_path, routes=[{"name": "x", "model": "missing", "match": {}}])
    feed = Feed(db, cfg)
    study = generate_uid()
    feed.series(study, 1, T0)
    report = tick(db, cfg, now=T0 + STABLE + 1)
    assert report.unrouted == [study] and infer_jobs(db) == []
    assert "unknown model 'missing'" in (study_row(db, study).note or "")


def test_routes_naming_the_same_model_make_one_job_with_all_destinations(
    tmp_path: Path, db: Database
) -> None:
    cfg = make_cfg(
        tmp_path,
        routes=[
            {
                "name": "chest",
                "model": "ct-lesion",
                "match": {"Modality": "CT", "BodyPartExamined": "CHEST"},
                "send_to": ["pacs"],
            },
            {
                "name": "big",
                "model": "ct-lesion",
                "match": {"ImageSize": "512x512"},
                "send_to": ["research", "pacs"],
            },
        ],
    )
    feed = Feed(db, cfg)
    study = generate_uid()
    chest, _ = feed.series(study, 2, T0, BodyPartExamined="CHEST", Rows=256, Columns=256)
    big, _ = feed.series(study, 3, T0, BodyPartExamined="HEAD", Rows=512, Columns=512)
    feed.series(study, 1, T0, BodyPartExamined="HEAD", Rows=256, Columns=256)  # no rule
    tick(db, cfg, now=T0 + STABLE + 1)
    (job,) = infer_jobs(db)
    assert job.payload["series_instance_uids"] == sorted([chest, big])
    assert len(job.payload["sop_instance_uids"]) == 5
    assert job.payload["destinations"] == ["pacs", "research"]
    assert job.payload["routes"] == ["chest", "big"]


def test_route_on_calling_ae_and_image_properties(tmp_path: Path, db: Database) -> None:
    cfg = make_cfg(
        tmp_path,
        routes=[
            {
                "name": "er-cxr",
                "model": "cxr-nodule",
                "match": {
                    "CallingAETitle": ["ER_DX"],
                    "PhotometricInterpretation": ["MONOCHROME1", "MONOCHROME2"],
                },
            }
        ],
    )
    feed = Feed(db, cfg)
    er, other = generate_uid(), generate_uid()
    feed.series(er, 1, T0, modality="DX", sop_class=DX, calling_ae="ER_DX",
                PhotometricInterpretation="MONOCHROME1")  # fmt: skip
    feed.series(other, 1, T0, modality="DX", sop_class=DX, calling_ae="WARD",
                PhotometricInterpretation="MONOCHROME1")  # fmt: skip
    report = tick(db, cfg, now=T0 + STABLE + 1)
    assert report.scheduled == [er] and report.unrouted == [other]


def test_unreadable_file_falls_back_on_the_table_columns(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    study = generate_uid()
    feed.series(study, 1, T0, write_file=False)
    report = tick(db, cfg, now=T0 + STABLE + 1)
    assert [j.payload["model"] for j in infer_jobs(db)] == ["ct-lesion"]
    assert report.scheduled == [study]


def test_trickling_study_is_forced_after_the_ceiling(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    study = generate_uid()
    series = generate_uid()
    t = T0
    while t < T0 + FORCE + 30:  # one instance every 30 s: never quiet for 60 s
        feed.add(study, series, t)
        report = tick(db, cfg, now=t + 1)
        if t + 1 < T0 + FORCE:
            assert report.due == 0
        t += 30
    assert len(infer_jobs(db)) == 1
    assert study_row(db, study).state == StudyState.SCHEDULED


def test_reopened_study_ceiling_counts_from_the_late_instance(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    study = generate_uid()
    series = generate_uid()
    feed.add(study, series, T0)
    tick(db, cfg, now=T0 + STABLE + 1)
    later = T0 + 10 * FORCE  # the study's first instance is far beyond the ceiling
    feed.add(study, series, later)
    assert tick(db, cfg, now=later + 1).due == 0
    feed.add(study, series, later + 30)
    assert tick(db, cfg, now=later + 31).due == 0
    assert len(infer_jobs(db)) == 1


def tick_racing_an_arrival(
    db: Database,
    cfg: NodeConfig,
    feed: Feed,
    monkeypatch: pytest.MonkeyPatch,
    study: str,
    series: str,
    *,
    arrives: float,
    now: float,
) -> tuple[TickReport, str]:
    """One pass at ``now`` during which the receiver commits an instance (received at
    ``arrives``) between the scheduler's read and its write; returns its SOP UID too."""
    real = scheduler._series_of
    late: list[str] = []

    def racing(db_: Database, uid: str) -> list[Any]:
        out = real(db_, uid)
        late.append(feed.add(study, series, arrives))
        return out

    monkeypatch.setattr(scheduler, "_series_of", racing)
    report = tick(db, cfg, now=now)
    monkeypatch.setattr(scheduler, "_series_of", real)
    return report, late[0]


def test_instance_arriving_during_a_pass_is_not_lost(
    db: Database, cfg: NodeConfig, feed: Feed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver commits an instance between the scheduler's read and its write."""
    study = generate_uid()
    series, _ = feed.series(study, 2, T0)
    report, late = tick_racing_an_arrival(
        db, cfg, feed, monkeypatch, study, series, arrives=T0 + STABLE + 0.5, now=T0 + STABLE + 1
    )
    assert report.skipped_changed == [study] and infer_jobs(db) == []
    assert study_row(db, study).state == StudyState.RECEIVING

    report = tick(db, cfg, now=T0 + 2 * STABLE + 1)
    (job,) = infer_jobs(db)
    assert late in job.payload["sop_instance_uids"]
    assert len(job.payload["sop_instance_uids"]) == 3


def test_forced_study_changed_during_a_pass_is_finished_and_taken_again(
    db: Database, cfg: NodeConfig, feed: Feed, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = generate_uid()
    series = generate_uid()
    feed.add(study, series, T0)
    feed.add(study, series, T0 + FORCE)  # still arriving at the ceiling
    report, late = tick_racing_an_arrival(
        db, cfg, feed, monkeypatch, study, series, arrives=T0 + FORCE + 0.5, now=T0 + FORCE + 1
    )
    assert report.scheduled == [study] and len(infer_jobs(db)) == 1
    assert late not in infer_jobs(db)[0].payload["sop_instance_uids"]
    # The instance that came in during the pass is a late arrival: its own run follows.
    report = tick(db, cfg, now=T0 + FORCE + STABLE + 2)
    assert len(report.jobs_created) == 1
    assert late in infer_jobs(db)[1].payload["sop_instance_uids"]


def test_infer_key_depends_on_input_and_version_not_order() -> None:
    a = infer_key("1.2.3", "m", "1.0", ["1.1", "1.2"])
    assert a == infer_key("1.2.3", "m", "1.0", ["1.2", "1.1"])
    assert a != infer_key("1.2.3", "m", "1.1", ["1.1", "1.2"])
    assert a != infer_key("1.2.3", "m", "1.0", ["1.1", "1.2", "1.3"])
    assert a != infer_key("1.2.4", "m", "1.0", ["1.1", "1.2"])
    long = infer_key("1." * 32, "x" * 300, "1", ["1"])
    assert len(long) <= 255 and long != infer_key("1." * 32, "y" * 300, "1", ["1"])


def test_new_model_version_gives_a_new_job(tmp_path: Path, db: Database) -> None:
    cfg = make_cfg(tmp_path)
    feed = Feed(db, cfg)
    study = generate_uid()
    feed.series(study, 1, T0)
    tick(db, cfg, now=T0 + STABLE + 1)
    write_package(tmp_path / "models", "ct-2.2", "ct-lesion", "2.2")
    with db.session() as s:  # an operator asks for the study to be evaluated again
        row = s.scalar(select(Study).where(Study.study_instance_uid == study))
        assert row is not None
        row.state = StudyState.RECEIVING
    report = tick(db, cfg, now=T0 + STABLE + 2)
    assert len(report.jobs_created) == 1
    assert [j.payload["model_version"] for j in infer_jobs(db)] == ["2.1", "2.2"]


def test_installed_packages_reads_every_version_of_every_dir(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    write_package(first, "p1", "cxr-nodule", "1.0")
    write_package(second, "p1", "cxr-nodule", "9.9")
    (second / "broken").mkdir()
    (second / "broken" / "manifest.toml").write_text("[model\nname=")
    (second / "noversion").mkdir()
    (second / "noversion" / "manifest.toml").write_text('[model]\nname = "nov"\n')
    (second / "empty").mkdir()
    single = write_package(tmp_path / "c", "only", "single", "0.1")
    found = installed_packages([first, second, tmp_path / "missing", single])
    assert {n: sorted(v) for n, v in found.items()} == {
        "cxr-nodule": ["1.0", "9.9"],
        "single": ["0.1"],
    }


def test_a_route_pins_a_version_otherwise_the_highest_runs(tmp_path: Path, db: Database) -> None:
    write_package(tmp_path / "old", "cxr", "cxr-nodule", "1.0.0")
    write_package(tmp_path / "new", "cxr", "cxr-nodule", "2.0.0")
    routes = [
        {"name": "latest", "model": "cxr-nodule", "match": {"Modality": ["DX"]}},
        {
            "name": "pinned",
            "model": "cxr-nodule",
            "model_version": "1.0.0",
            "match": {"Modality": ["DX"]},
        },
        {
            "name": "gone",
            "model": "cxr-nodule",
            "model_version": "0.5",
            "match": {"Modality": ["DX"]},
        },
    ]
    cfg = make_cfg(tmp_path, routes)
    cfg = cfg.model_copy(
        update={
            "inference": cfg.inference.model_copy(
                update={"model_dirs": [tmp_path / "old", tmp_path / "new"]}
            )
        }
    )
    feed = Feed(db, cfg)
    study = generate_uid()
    feed.series(study, 1, T0, modality="DX", sop_class=DX)
    report = tick(db, cfg, now=T0 + STABLE + 1)
    assert len(report.jobs_created) == 2
    assert sorted(j.payload["model_version"] for j in infer_jobs(db)) == ["1.0.0", "2.0.0"]
    assert any("version '0.5'" in e for e in report.errors)


def test_tick_checks_one_broken_study_does_not_stop_others(
    db: Database, cfg: NodeConfig, feed: Feed, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad, good = generate_uid(), generate_uid()
    feed.series(bad, 1, T0)
    feed.series(good, 1, T0)
    real = scheduler._series_of

    def flaky(db_: Database, uid: str) -> list[Any]:
        if uid == bad:
            raise OSError("spool unreadable")
        return real(db_, uid)

    monkeypatch.setattr(scheduler, "_series_of", flaky)
    report = tick(db, cfg, now=T0 + STABLE + 1, router=Router(cfg.routes))
    assert report.scheduled == [good]
    assert len(report.errors) == 1 and "spool unreadable" in report.errors[0]
    assert study_row(db, bad).state == StudyState.RECEIVING


@pytest.fixture
def scheduler_proc(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Database]]:
    models = tmp_path / "models"
    write_package(models, "ct", "ct-lesion", "2.1")
    conf = tmp_path / "airnode.toml"
    conf.write_text(
        f"""
[node]
data_dir = "{tmp_path / "data"}"
[study]
stable_after_s = 0.5
force_after_s = 30
[inference]
model_dirs = ["{models}"]
[[routes]]
name = "ct"
model = "ct-lesion"
match = {{ Modality = ["CT"] }}
"""
    )
    db = init_db(f"sqlite:///{tmp_path / 'data' / 'airnode.sqlite'}")
    exe = Path(sys.executable).with_name("airnode")
    proc = subprocess.Popen(
        [str(exe), "schedule", "--config", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc, conf, db
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        db.dispose()


def _wait(cond: Any, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_airnode_schedule_process_queues_jobs_reaps_and_stops_on_sigterm(
    scheduler_proc: tuple[subprocess.Popen[bytes], Path, Database],
) -> None:
    proc, conf, db = scheduler_proc
    cfg = parse_config({"node": {"data_dir": str(conf.parent / "data")}})
    feed = Feed(db, cfg)
    study = generate_uid()
    feed.series(study, 2, time.time())
    # A job whose worker died: its lease is over.
    dead_id, _ = jobs.enqueue(db, JobKind.SEND, "send:x:pacs", {})
    assert jobs.claim(db, JobKind.SEND, "gone:1", lease_s=0.01) is not None

    def states() -> tuple[int, str | None]:
        with db.read() as s:
            job = s.get(Job, dead_id)
            return len(infer_jobs(db)), str(job.status) if job else None

    assert _wait(lambda: states() == (1, "failed")), states()
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out.decode()
    assert study not in out.decode()  # UIDs are masked in the logs


def test_airnode_schedule_refuses_a_bad_rule_in_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(
        f'[node]\ndata_dir = "{tmp_path}"\n'
        '[[routes]]\nname = "r"\nmodel = "m"\nmatch = { Modaliti = "CT" }\n'
    )
    exe = Path(sys.executable).with_name("airnode")
    res = subprocess.run(
        [str(exe), "schedule", "-c", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert "unknown attribute 'Modaliti'" in res.stderr


@pytest.mark.postgres
def test_scheduler_on_postgresql(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The same pass on PostgreSQL: row lock on the study, savepoint-guarded inserts."""
    cfg = make_cfg(tmp_path)
    db = init_db(request.getfixturevalue("pg_url"))
    try:
        feed = Feed(db, cfg)
        study = generate_uid()
        feed.series(study, 2, T0)
        feed.series(study, 1, T0, modality="DX", sop_class=DX)
        report = tick(db, cfg, now=T0 + STABLE + 1)
        assert report.scheduled == [study] and len(report.jobs_created) == 2
        assert tick(db, cfg, now=T0 + STABLE + 2).jobs_created == []
        late_t = T0 + 1000
        feed.series(study, 1, late_t)
        report = tick(db, cfg, now=late_t + STABLE + 1)
        assert len(report.jobs_created) == 1 and len(report.jobs_existing) == 1
        assert study_row(db, study).state == StudyState.SCHEDULED
    finally:
        db.dispose()


@pytest.mark.integration
def test_studies_sent_with_storescu_get_exactly_one_job_per_model(tmp_path: Path) -> None:
    """Receiver (real C-STORE from dcmtk, everything sent twice) → scheduler → jobs."""
    from node.ops.synthetic import ct_series, dx_image, write_series
    from node.receive.server import Receiver
    from tests.conftest import free_port, require_tool

    storescu = require_tool("storescu")
    base = make_cfg(
        tmp_path,
        routes=[
            {"name": "cxr", "model": "cxr-nodule", "match": {"Modality": ["DX", "CR"]}},
            {"name": "ct", "model": "ct-lesion", "match": {"Modality": "CT", "ImageSize": "64x64"}},
        ],
    )
    cfg = base.model_copy(
        update={"node": base.node.model_copy(update={"port": free_port(), "ae_title": "AIRNODE"})}
    )
    ct = ct_series(12, 64, 64, seed=1)
    small = ct_series(3, 32, 32, seed=2)  # no rule takes 32x32
    files = write_series(ct, tmp_path / "ct") + write_series(small, tmp_path / "small")
    files += write_series([dx_image(rows=128, cols=128, seed=3)], tmp_path / "dx")
    db = init_db(cfg.node.resolved_database_url)
    receiver = Receiver(cfg)
    receiver.start()
    try:

        def send(paths: list[Path]) -> None:
            res = subprocess.run(
                [storescu, "-aec", "AIRNODE", "127.0.0.1", str(cfg.node.port), *map(str, paths)],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
            assert res.returncode == 0, res.stderr

        send(files)
        send(files)  # a resend: duplicates, no new instance, no new job
        t = time.time() + STABLE + 1
        report = tick(db, cfg, now=t)
        assert sorted(report.scheduled) == sorted([ct[0].StudyInstanceUID, dx_study(files)])
        assert report.unrouted == [small[0].StudyInstanceUID]
        by_model = {j.payload["model"]: j for j in infer_jobs(db)}
        assert set(by_model) == {"ct-lesion", "cxr-nodule"}
        assert by_model["ct-lesion"].payload["sop_instance_uids"] == sorted(
            d.SOPInstanceUID for d in ct
        )
        assert tick(db, cfg, now=t + 1).jobs_created == []

        # A second CT series of the same study, sent later: only ct-lesion runs again.
        extra = ct_series(4, 64, 64, seed=1, series_number=2)
        send(write_series(extra, tmp_path / "ct2"))
        report = tick(db, cfg, now=time.time() + STABLE + 1)
        assert len(report.jobs_created) == 1
        new = next(j for j in infer_jobs(db) if j.id == report.jobs_created[0])
        assert new.payload["model"] == "ct-lesion"
        assert len(new.payload["sop_instance_uids"]) == 16
        assert len(infer_jobs(db)) == 3
    finally:
        receiver.stop()
        db.dispose()


def dx_study(files: list[Path]) -> str:
    from pydicom import dcmread

    return str(dcmread(files[-1], stop_before_pixels=True).StudyInstanceUID)
