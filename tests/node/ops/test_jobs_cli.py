"""``airnode jobs list|show|retry|cancel``, in-process and as the installed command."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.ops.cli import main
from node.store import jobs
from node.store.db import Database, Job, JobKind, JobStatus, init_db


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Database]]:
    conf = tmp_path / "airnode.toml"
    conf.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    db = init_db(f"sqlite:///{tmp_path / 'data' / 'airnode.sqlite'}")
    try:
        yield conf, db
    finally:
        db.dispose()


def status_of(db: Database, job_id: int) -> JobStatus:
    with db.read() as s:
        job = s.get(Job, job_id)
    assert job is not None
    return job.status


def dead_job(db: Database, key: str) -> int:
    job_id, _ = jobs.enqueue(db, JobKind.SEND, key, {"destination": "pacs"})
    jobs.cancel(db, job_id, "0xA900: identifier mismatch")
    return job_id


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json_and_filters(
    setup: tuple[Path, Database], capsys: pytest.CaptureFixture[str]
) -> None:
    conf, db = setup
    a, _ = jobs.enqueue(db, JobKind.INFER, "infer:a", {"model": "cxr-nodule"})
    b = dead_job(db, "send:b")
    code, out, _ = run_cli(capsys, "jobs", "list", "-c", str(conf), "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == [b, a]  # newest first
    assert rows[0]["status"] == "dead" and rows[0]["last_error"].startswith("0xA900")
    assert rows[1]["payload"] == {"model": "cxr-nodule"}
    assert rows[1]["priority"] == 100  # routine, the default

    code, out, _ = run_cli(capsys, "jobs", "list", "-c", str(conf), "--json", "--status", "dead")
    assert [json.loads(x)["id"] for x in out.splitlines()] == [b]
    code, out, _ = run_cli(capsys, "jobs", "list", "-c", str(conf), "--json", "--kind", "infer")
    assert [json.loads(x)["id"] for x in out.splitlines()] == [a]
    code, out, _ = run_cli(capsys, "jobs", "list", "-c", str(conf), "--json", "--limit", "1")
    assert [json.loads(x)["id"] for x in out.splitlines()] == [b]


def test_list_table(setup: tuple[Path, Database], capsys: pytest.CaptureFixture[str]) -> None:
    conf, db = setup
    jobs.enqueue(db, JobKind.INFER, "infer:a", {"model": "cxr-nodule"}, priority=300)
    code, out, _ = run_cli(capsys, "jobs", "list", "-c", str(conf))
    assert code == 0
    assert "cxr-nodule" in out and "queued" in out and "infer" in out
    assert "stat" in out  # the priority, by its name


def test_show(setup: tuple[Path, Database], capsys: pytest.CaptureFixture[str]) -> None:
    conf, db = setup
    job_id = dead_job(db, "send:x")
    code, out, _ = run_cli(capsys, "jobs", "show", str(job_id), "-c", str(conf))
    assert code == 0
    shown = json.loads(out)
    assert shown["id"] == job_id and shown["key"] == "send:x" and shown["status"] == "dead"
    code, out, err = run_cli(capsys, "jobs", "show", "4242", "-c", str(conf))
    assert code == 2 and out == ""
    assert err.strip() == "airnode: no job with id 4242 (see `airnode jobs list`)"


def test_retry_and_cancel(setup: tuple[Path, Database], capsys: pytest.CaptureFixture[str]) -> None:
    conf, db = setup
    job_id = dead_job(db, "send:x")
    code, out, _ = run_cli(capsys, "jobs", "retry", str(job_id), "-c", str(conf))
    assert code == 0 and f"job {job_id} queued again" in out
    assert status_of(db, job_id) == JobStatus.QUEUED

    code, out, _ = run_cli(capsys, "jobs", "cancel", str(job_id), "-c", str(conf))
    assert code == 0 and f"job {job_id} cancelled" in out
    assert status_of(db, job_id) == JobStatus.DEAD

    # A cancelled (dead) job cannot be cancelled again.
    code, _, err = run_cli(capsys, "jobs", "cancel", str(job_id), "-c", str(conf))
    assert code == 2 and err.count("\n") == 1
    assert f"job {job_id}: job cannot go from dead to dead" in err


def test_running_job_is_neither_retried_nor_cancelled(
    setup: tuple[Path, Database], capsys: pytest.CaptureFixture[str]
) -> None:
    conf, db = setup
    job_id, _ = jobs.enqueue(db, JobKind.INFER, "infer:r", {})
    assert jobs.claim(db, JobKind.INFER, "gpu-host:123") is not None
    for action in ("retry", "cancel"):
        code, _, err = run_cli(capsys, "jobs", action, str(job_id), "-c", str(conf))
        assert code == 2 and err.count("\n") == 1
        assert "gpu-host:123" in err
    assert status_of(db, job_id) == JobStatus.RUNNING


def test_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("[node]\nport = 0\n")
    code, _, err = run_cli(capsys, "jobs", "list", "-c", str(conf))
    assert code == 2
    assert err.startswith("airnode: config error: node.port: ") and err.count("\n") == 1


def test_installed_command(setup: tuple[Path, Database]) -> None:
    conf, db = setup
    job_id = dead_job(db, "send:sub")
    exe = str(Path(sys.executable).with_name("airnode"))

    def airnode(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, "jobs", *args, "-c", str(conf)], capture_output=True, text=True, timeout=120
        )

    listed = airnode("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout.splitlines()[0])["id"] == job_id
    retried = airnode("retry", str(job_id))
    assert retried.returncode == 0 and "queued again" in retried.stdout
    assert status_of(db, job_id) == JobStatus.QUEUED
    missing = airnode("cancel", "999")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "airnode: no job with id 999 (see `airnode jobs list`)"
    assert "Traceback" not in missing.stderr
