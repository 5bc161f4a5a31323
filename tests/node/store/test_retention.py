"""Retention: by age, by watermark and emergency floor, never a study with unfinished jobs.

The watermark tests run on a real 4 MiB tmpfs mounted for the test (root only; the
others inject the disk-usage function and run everywhere).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from node.config import NodeConfig
from node.ops.cli import main
from node.store import jobs
from node.store.db import (
    AuditEvent,
    Database,
    Instance,
    Job,
    JobKind,
    JobStatus,
    Result,
    Study,
    StudyState,
    init_db,
    now,
)
from node.store.durable import uid_path
from node.store.payloads import SendPayload
from node.store.retention import DAY_S, DiskUsage, Retention, disk_usage, purge
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

T = now()


def make_cfg(data: Path, db_file: Path | str, **retention: object) -> NodeConfig:
    url = db_file if isinstance(db_file, str) else f"sqlite:///{db_file}"
    return NodeConfig.model_validate(
        {
            "node": {"data_dir": str(data), "database_url": url},
            "retention": {"enabled": True, **retention},
        }
    )


@pytest.fixture
def env(anydb: Database, tmp_path: Path) -> tuple[NodeConfig, Database]:
    """SQLite and, where a server can be had, PostgreSQL (row locks, not BEGIN IMMEDIATE)."""
    return make_cfg(tmp_path / "data", anydb.engine.url.render_as_string(False)), anydb


def add_study(
    db: Database,
    cfg: NodeConfig,
    uid: str,
    *,
    n: int = 3,
    size: int = 1000,
    finished_days_ago: float = 40.0,
    jobs_status: tuple[JobStatus, ...] = (JobStatus.DONE,),
    state: StudyState = StudyState.SCHEDULED,
    late: bool = False,
) -> list[Path]:
    """A study with ``n`` instance files in the spool, scheduled ``finished_days_ago``,
    with one job per entry of ``jobs_status`` (ended then, when they have ended)."""
    t = T - finished_days_ago * DAY_S
    paths = []
    with db.session() as s:
        for i in range(n):
            sop = f"{uid}.{i + 1}"
            rel = uid_path(sop)
            path = cfg.node.spool_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(size))
            paths.append(path)
            s.add(
                Instance(
                    sop_instance_uid=sop,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    study_instance_uid=uid,
                    series_instance_uid=f"{uid}.0",
                    modality="CT",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=rel.as_posix(),
                    sha256="0" * 64,
                    size=size,
                    calling_ae="SCANNER",
                    received_at=t - 60,
                )
            )
        s.add(
            Study(
                study_instance_uid=uid,
                first_received_at=t - 120,
                last_received_at=t + 10 if late else t - 60,
                state=state,
                scheduled_at=t,
                instance_count=n,
            )
        )
    for k, status in enumerate(jobs_status):
        job_id, _ = jobs.enqueue(
            db, JobKind.INFER, f"infer:{uid}:{k}", {"m": k}, study_instance_uid=uid
        )
        with db.session() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    status=status,
                    finished_at=t if status in (JobStatus.DONE, JobStatus.DEAD) else None,
                )
            )
    return paths


def instances_of(db: Database, uid: str) -> int:
    with db.read() as s:
        return int(
            s.scalar(select(func.count(Instance.id)).where(Instance.study_instance_uid == uid)) or 0
        )


def audit(db: Database) -> list[AuditEvent]:
    with db.read() as s:
        return list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def roomy(_: Path) -> DiskUsage:
    """A disk with plenty of room: only age removes anything."""
    return DiskUsage(total=100 * 2**40, used=10 * 2**40, free=90 * 2**40)


def full(_: Path) -> DiskUsage:
    """A disk with no free byte left: watermark and emergency floor both crossed."""
    return DiskUsage(total=100 * 2**30, used=100 * 2**30, free=0)


def test_never_removes_a_study_with_unfinished_jobs(env: tuple[NodeConfig, Database]) -> None:
    cfg, db = env
    kept = {
        "1.2.1": add_study(db, cfg, "1.2.1", jobs_status=(JobStatus.DONE, JobStatus.QUEUED)),
        "1.2.2": add_study(db, cfg, "1.2.2", jobs_status=(JobStatus.RUNNING,)),
        "1.2.3": add_study(db, cfg, "1.2.3", jobs_status=(JobStatus.FAILED,)),  # awaits retry
        "1.2.4": add_study(db, cfg, "1.2.4", jobs_status=(), state=StudyState.RECEIVING),
        "1.2.5": add_study(db, cfg, "1.2.5", late=True),  # a late series, not yet scheduled
    }
    gone = add_study(db, cfg, "1.2.9", jobs_status=(JobStatus.DONE, JobStatus.DEAD))
    # A send job of a study keeps it too.
    send_kept = add_study(db, cfg, "1.2.6")
    jobs.enqueue(
        db,
        JobKind.SEND,
        "send:x:pacs",
        SendPayload(result_id=1, sop_instance_uid="1.9", path="ab/x.dcm", destination="pacs"),
        study_instance_uid="1.2.6",
    )
    report = purge(db, cfg, usage=full)  # old, and the disk is full: everything is pressed
    assert [(r.kind, r.uid) for r in report.removals] == [("study", "1.2.9")]
    assert report.short  # still full, nothing else may go
    assert not any(p.exists() for p in gone) and instances_of(db, "1.2.9") == 0
    for uid, paths in {**kept, "1.2.6": send_kept}.items():
        assert all(p.exists() for p in paths), uid
        assert instances_of(db, uid) == 3, uid


def test_dry_run_lists_without_removing(env: tuple[NodeConfig, Database]) -> None:
    cfg, db = env
    old = add_study(db, cfg, "1.3.1", finished_days_ago=40)
    add_study(db, cfg, "1.3.2", finished_days_ago=1)
    report = purge(db, cfg, dry_run=True)
    assert report.dry_run
    assert [(r.uid, r.reason, r.files, r.bytes) for r in report.removals] == [
        ("1.3.1", "age", 3, 3000)
    ]
    assert all(p.exists() for p in old) and instances_of(db, "1.3.1") == 3
    assert audit(db) == []


def test_by_age_oldest_first_each_removal_audited(env: tuple[NodeConfig, Database]) -> None:
    cfg, db = env
    older = add_study(db, cfg, "1.4.1", finished_days_ago=50, state=StudyState.UNROUTED)
    old = add_study(db, cfg, "1.4.2", finished_days_ago=31)
    recent = add_study(db, cfg, "1.4.3", finished_days_ago=29)
    report = purge(db, cfg, usage=roomy)  # plenty of room
    assert [(r.uid, r.reason) for r in report.removals] == [("1.4.1", "age"), ("1.4.2", "age")]
    assert not any(p.exists() for p in older + old)
    assert all(p.exists() for p in recent)
    events = audit(db)
    assert [e.event for e in events] == ["purge_instance"] * 6
    assert {e.sop_instance_uid for e in events} == {
        f"1.4.{s}.{i}" for s in (1, 2) for i in (1, 2, 3)
    }
    assert all(e.detail and e.detail.endswith(": age") for e in events)
    with db.read() as s:
        st = s.scalar(select(Study).where(Study.study_instance_uid == "1.4.2"))
    assert st is not None and st.purged_at is not None and st.instance_count == 0
    # A second pass finds nothing more: idempotent.
    assert purge(db, cfg).removals == []


def test_outbox_files_by_age_only_when_their_sends_are_finished(
    env: tuple[NodeConfig, Database],
) -> None:
    cfg, db = env
    files: dict[str, Path] = {}
    for name, status in (("dead", JobStatus.DEAD), ("queued", JobStatus.QUEUED)):
        sop = f"1.5.{len(files) + 1}"
        rel = uid_path(sop)
        path = cfg.node.outbox_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 500)
        files[name] = path
        with db.session() as s:
            row = Result(
                sop_instance_uid=sop,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                study_instance_uid="1.5",
                kind="sr",
                model="m",
                path=rel.as_posix(),
                created_at=T - 40 * DAY_S,
            )
            s.add(row)
            s.flush()
            rid = row.id
        job_id, _ = jobs.enqueue(
            db,
            JobKind.SEND,
            f"send:{sop}:pacs",
            SendPayload(result_id=rid, sop_instance_uid=sop, path=rel.as_posix(), destination="p"),
        )
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(status=status))
    report = purge(db, cfg, usage=roomy)
    assert [(r.kind, r.reason) for r in report.removals] == [("result", "age")]
    assert not files["dead"].exists() and files["queued"].exists()
    assert [e.event for e in audit(db)] == ["purge_result"]


# -- watermarks and the emergency floor on a small real file system ---------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for the test and unmounted after it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(db: Database, cfg: NodeConfig) -> tuple[list[list[Path]], list[Path]]:
    """Six finished 400 KiB studies, finished 6…1 days ago, and a busy one."""
    finished = [
        add_study(db, cfg, f"1.6.{i}", n=4, size=100 * 1024, finished_days_ago=7 - i)
        for i in range(1, 7)
    ]
    busy = add_study(db, cfg, "1.6.9", n=4, size=100 * 1024, jobs_status=(JobStatus.RUNNING,))
    return finished, busy


def test_high_watermark_removes_oldest_until_the_low_one(tmpfs: Path, tmp_path: Path) -> None:
    cfg = make_cfg(
        tmpfs,
        tmp_path / "db.sqlite",
        spool_keep_days=None,
        high_watermark_percent=50,
        low_watermark_percent=35,
        emergency_free_bytes=0,
    )
    db = init_db(cfg.node.resolved_database_url)
    finished, busy = fill(db, cfg)
    before = disk_usage(cfg.node.spool_dir)
    assert before.used_percent > 60  # 7 × 400 KiB of 4 MiB

    dry = purge(db, cfg, dry_run=True)
    report = purge(db, cfg)
    after = disk_usage(cfg.node.spool_dir)
    removed = [r.uid for r in report.removals]
    assert [r.uid for r in dry.removals] == removed  # the dry run predicted it
    assert removed == [f"1.6.{i}" for i in range(1, len(removed) + 1)]  # oldest first
    assert {r.reason for r in report.removals} == {"watermark"}
    assert after.used_percent <= 35 and not report.short
    assert len(removed) < 6  # stops at the low watermark, no further
    assert all(p.exists() for p in busy)
    assert all(p.exists() for p in finished[len(removed)])
    db.dispose()


def test_emergency_floor_on_every_tick_never_the_busy_study(tmpfs: Path, tmp_path: Path) -> None:
    # 3.8 MiB free wanted on a 4 MiB disk holding 2.8 MiB: more than all the finished
    # studies can give back while the busy one holds its 400 KiB.
    floor = 38 * 1024 * 1024 // 10
    cfg = make_cfg(
        tmpfs,
        tmp_path / "db.sqlite",
        spool_keep_days=None,
        high_watermark_percent=100,
        low_watermark_percent=100,
        emergency_free_bytes=floor,
        interval_s=3600,
    )
    db = init_db(cfg.node.resolved_database_url)
    finished, busy = fill(db, cfg)
    keeper = Retention(db, cfg)
    keeper._next = 1e18  # the periodic pass is far away; only the floor can start one
    report = keeper.tick(mono=100.0)
    assert report is not None
    assert {r.reason for r in report.removals} == {"emergency"}
    assert [r.uid for r in report.removals] == [f"1.6.{i}" for i in range(1, 7)]
    assert report.short  # the busy study alone still holds too much for the floor
    assert all(p.exists() for p in busy)
    assert not any(p.exists() for f in finished for p in f)
    assert disk_usage(cfg.node.spool_dir).free < floor
    # Still below the floor: the next tick tries again once EMERGENCY_EVERY_S passed.
    assert keeper.tick(mono=101.0) is None
    assert keeper.tick(mono=100.0 + Retention.EMERGENCY_EVERY_S) is not None
    db.dispose()


def test_periodic_pass_waits_for_its_interval(env: tuple[NodeConfig, Database]) -> None:
    cfg, db = env
    add_study(db, cfg, "1.7.1")
    keeper = Retention(db, cfg, usage=roomy)
    first = keeper.tick(mono=0.0)
    assert first is not None and [r.uid for r in first.removals] == ["1.7.1"]
    add_study(db, cfg, "1.7.2")
    assert keeper.tick(mono=cfg.retention.interval_s - 1) is None
    later = keeper.tick(mono=cfg.retention.interval_s)
    assert later is not None and [r.uid for r in later.removals] == ["1.7.2"]


def test_purge_command_dry_run_then_for_real(
    env: tuple[NodeConfig, Database], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, db = env
    paths = add_study(db, cfg, "1.8.1")
    conf = tmp_path / "airnode.toml"
    conf.write_text(
        f'[node]\ndata_dir = "{cfg.node.data_dir}"\n'
        f'database_url = "{cfg.node.resolved_database_url}"\n'
        "[retention]\nhigh_watermark_percent = 100.0\nlow_watermark_percent = 100.0\n"
        "emergency_free_bytes = 0\n",
        encoding="utf-8",
    )
    assert main(["purge", "-c", str(conf), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove study 1.8.1: 3 file(s), 3000 bytes (age)" in out
    assert all(p.exists() for p in paths)
    assert main(["purge", "-c", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "removed study 1.8.1" in out
    assert not any(p.exists() for p in paths)


def test_a_failing_pass_is_logged_and_waits_for_the_next_interval(
    env: tuple[NodeConfig, Database],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg, db = env
    paths = add_study(db, cfg, "1.9.1")
    calls = []

    def broken(*args: object, **kwargs: object) -> None:
        calls.append(1)
        raise PermissionError("spool is read-only")

    monkeypatch.setattr("node.store.retention.purge", broken)
    keeper = Retention(db, cfg, usage=roomy)
    assert keeper.tick(mono=0.0) is None  # no exception reaches the scheduler loop
    assert "retention pass failed" in caplog.text
    assert keeper.tick(mono=1.0) is None and calls == [1]  # not retried on every tick
    assert all(p.exists() for p in paths)
