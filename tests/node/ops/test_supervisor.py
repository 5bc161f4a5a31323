"""The supervisor, driven with fake stages in a real supervisor process.

The fake stages below are module-level so that the spawned children can import them.
Each writes ``<data_dir>/pids/<stage>.<pid>`` when it starts, and the well-behaved
ones write ``<stage>.<pid>.stopped`` when SIGTERM asks them to stop, so a test can
see which processes ran, which were restarted and which were stopped cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
from sqlalchemy import create_engine, inspect

from node.config import NodeConfig
from node.ops.supervisor import (
    RestartPolicy,
    StageSpec,
    default_stages,
    read_stage_status,
    stage_status_path,
)
from tests.peers import logging_process, stop_and_read

REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------ fake stages


def _stage_name() -> str:
    return os.environ.get("AIRNODE_STAGE", "?")


def _mark(cfg: NodeConfig, suffix: str = "", replica: int = 0) -> Path:
    d = cfg.node.data_dir / "pids"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{_stage_name()}.{os.getpid()}{suffix}"
    p.write_text(str(replica), encoding="utf-8")
    return p


def fake_steady(cfg: NodeConfig, replica: int) -> None:
    """Runs until SIGTERM, then records a clean stop."""
    stop = False

    def _term(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _term)
    _mark(cfg, replica=replica)
    while not stop:
        time.sleep(0.05)
    _mark(cfg, ".stopped")


def fake_crasher(cfg: NodeConfig, replica: int) -> None:
    """Dies shortly after starting, like a stage hitting a fatal bug."""
    _mark(cfg)
    time.sleep(0.1)
    os._exit(3)


def fake_raiser(cfg: NodeConfig, replica: int) -> None:
    """Raises, like a stage with a bug."""
    _mark(cfg)
    raise RuntimeError("stage bug for the test")


def fake_stubborn(cfg: NodeConfig, replica: int) -> None:
    """Ignores SIGTERM: the supervisor has to kill it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _mark(cfg)
    while True:
        time.sleep(0.05)


STAGE_SETS: dict[str, list[StageSpec]] = {
    "steady": [StageSpec("steady", fake_steady, replicas=2), StageSpec("other", fake_steady)],
    "flaky": [StageSpec("steady", fake_steady), StageSpec("flaky", fake_crasher)],
    "stubborn": [StageSpec("steady", fake_steady), StageSpec("stubborn", fake_stubborn)],
    "raiser": [StageSpec("raiser", fake_raiser)],
    "by_name": [StageSpec("named", "tests.node.ops.test_supervisor:fake_steady")],
}


def serve(data_dir: str, stage_set: str, crash_loop_count: int) -> None:
    """Body of the supervisor process the tests start (``python -c``)."""
    from node.ops.supervisor import run

    cfg = NodeConfig.model_validate({"node": {"data_dir": data_dir}})
    policy = RestartPolicy(
        base_delay_s=0.05,
        max_delay_s=0.2,
        crash_loop_count=crash_loop_count,
        crash_loop_window_s=600,
        stop_timeout_s=1.5,
    )
    run(cfg, STAGE_SETS[stage_set], policy)


# ---------------------------------------------------------------------- helpers


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, exited but not yet reaped by init, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _pids(data_dir: Path, stage: str) -> list[int]:
    d = data_dir / "pids"
    if not d.exists():
        return []
    out = []
    for p in d.iterdir():
        name, _, rest = p.name.partition(".")
        if name == stage and rest.isdigit():
            out.append(int(rest))
    return sorted(out)


def _stopped(data_dir: Path, pid: int, stage: str) -> bool:
    return (data_dir / "pids" / f"{stage}.{pid}.stopped").exists()


class Node:
    def __init__(self, proc: subprocess.Popen[str], data_dir: Path) -> None:
        self.proc = proc
        self.data_dir = data_dir

    def all_pids(self) -> list[int]:
        d = self.data_dir / "pids"
        return [int(p.name.split(".")[1]) for p in d.iterdir() if p.name.count(".") == 1]

    def stop(self, sig: int = signal.SIGTERM, group: bool = False) -> tuple[int, str]:
        if group:  # what a terminal's Ctrl-C does: the signal reaches every process
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    procs: list[subprocess.Popen[str]] = []

    def _start(stage_set: str, crash_loop_count: int = 1000) -> Node:
        data_dir = tmp_path / "data"
        code = (
            "from tests.node.ops.test_supervisor import serve; "
            f"serve({str(data_dir)!r}, {stage_set!r}, {crash_loop_count})"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, like a shell job
        )
        procs.append(proc)
        return Node(proc, data_dir)

    yield _start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)


# ------------------------------------------------------------------------ tests


def test_sigterm_stops_every_child_cleanly_and_exits_zero(start_node: Callable[..., Node]) -> None:
    node = start_node("steady")
    _wait_for(lambda: len(_pids(node.data_dir, "steady-0")) == 1, "steady-0")
    _wait_for(lambda: len(_pids(node.data_dir, "steady-1")) == 1, "steady-1")
    _wait_for(lambda: len(_pids(node.data_dir, "other")) == 1, "other")
    status = read_stage_status(node.data_dir / "run" / "stages.json")
    assert status is not None
    assert set(status["stages"]) == {"steady-0", "steady-1", "other"}
    # Each copy was told its replica index (the worker's GPU comes from it).
    for stage, replica in (("steady-0", "0"), ("steady-1", "1"), ("other", "0")):
        (pid,) = _pids(node.data_dir, stage)
        assert (node.data_dir / "pids" / f"{stage}.{pid}").read_text() == replica

    code, err = node.stop(signal.SIGTERM)

    assert code == 0, err
    for stage in ("steady-0", "steady-1", "other"):
        (pid,) = _pids(node.data_dir, stage)
        assert _stopped(node.data_dir, pid, stage), f"{stage} was not stopped by SIGTERM"
        assert not _alive(pid)
    final = read_stage_status(node.data_dir / "run" / "stages.json")
    assert final is not None and final["stopped"] is True


def test_ctrl_c_stops_like_sigterm(start_node: Callable[..., Node]) -> None:
    node = start_node("steady")
    _wait_for(lambda: len(_pids(node.data_dir, "other")) == 1, "other")
    _wait_for(lambda: len(_pids(node.data_dir, "steady-1")) == 1, "steady-1")
    _wait_for(lambda: len(_pids(node.data_dir, "steady-0")) == 1, "steady-0")

    code, err = node.stop(signal.SIGINT, group=True)

    assert code == 0, err
    for stage in ("steady-0", "steady-1", "other"):
        (pid,) = _pids(node.data_dir, stage)
        assert _stopped(node.data_dir, pid, stage)  # stopped through the forwarded SIGTERM
        assert not _alive(pid)
    assert "restarting" not in err
    assert "Traceback" not in err


def test_crashed_stage_is_restarted_and_others_left_alone(
    start_node: Callable[..., Node],
) -> None:
    node = start_node("flaky")
    _wait_for(lambda: len(_pids(node.data_dir, "flaky")) >= 2, "a second start of the flaky stage")

    code, err = node.stop()

    assert code == 0, err
    assert len(_pids(node.data_dir, "steady")) == 1, "a healthy stage was restarted"
    assert "stage flaky exited (3); restarting" in err
    assert not any(_alive(p) for p in node.all_pids())


def test_crash_loop_stops_restarting_that_stage_only(start_node: Callable[..., Node]) -> None:
    node = start_node("flaky", crash_loop_count=2)
    status_file = node.data_dir / "run" / "stages.json"

    def fatal() -> bool:
        st = read_stage_status(status_file)
        return st is not None and st["stages"]["flaky"]["state"] == "fatal"

    _wait_for(fatal, "the flaky stage to be declared fatal")
    status = read_stage_status(status_file)
    assert status is not None
    assert status["stages"]["steady"]["state"] == "running"
    assert status["stages"]["flaky"]["last_exit"] == 3

    code, err = node.stop()

    assert code == 0, err
    assert len(_pids(node.data_dir, "flaky")) == 2  # declared fatal at the 2nd exit, never again
    assert "CRITICAL" in err and "crash loop" in err


def test_stage_exception_is_logged_and_restarted(start_node: Callable[..., Node]) -> None:
    node = start_node("raiser")
    _wait_for(lambda: len(_pids(node.data_dir, "raiser")) >= 2, "a restart after the exception")

    code, err = node.stop()

    assert code == 0, err
    assert "stage raiser crashed" in err
    assert "RuntimeError: stage bug for the test" in err
    assert "stage raiser exited (1); restarting" in err


def test_stage_ignoring_sigterm_is_killed_after_the_timeout(
    start_node: Callable[..., Node],
) -> None:
    node = start_node("stubborn")
    _wait_for(lambda: len(_pids(node.data_dir, "stubborn")) == 1, "stubborn")
    _wait_for(lambda: len(_pids(node.data_dir, "steady")) == 1, "steady")

    code, err = node.stop()

    assert code == 0, err
    assert "stage stubborn did not stop" in err
    assert not any(_alive(p) for p in node.all_pids())


def test_supervisor_killed_hard_leaves_no_orphans(start_node: Callable[..., Node]) -> None:
    node = start_node("steady")
    for stage in ("steady-0", "steady-1", "other"):
        _wait_for(lambda s=stage: len(_pids(node.data_dir, s)) == 1, stage)  # type: ignore[misc]
    children = node.all_pids()

    node.stop(signal.SIGKILL)

    _wait_for(lambda: not any(_alive(p) for p in children), "children to exit after kill -9")
    # PR_SET_PDEATHSIG delivered SIGTERM, so they even stopped cleanly.
    assert all(
        any(_stopped(node.data_dir, p, s) for s in ("steady-0", "steady-1", "other"))
        for p in children
    )


def test_run_migrates_the_database_and_imports_stages_by_name(
    start_node: Callable[..., Node],
) -> None:
    node = start_node("by_name")
    _wait_for(lambda: len(_pids(node.data_dir, "named")) == 1, "the stage given as a string")
    engine = create_engine(f"sqlite:///{node.data_dir / 'airnode.sqlite'}")
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"jobs", "instances", "studies", "results"} <= tables

    code, err = node.stop()
    assert code == 0, err


def test_status_file_logs_are_json_when_configured(tmp_path: Path) -> None:
    """With log_json the supervisor's own lines are JSON objects tagged with the stage."""
    data_dir = tmp_path / "data"
    code = (
        "from node.config import NodeConfig; from node.ops.supervisor import run, RestartPolicy, "
        "StageSpec; from tests.node.ops.test_supervisor import fake_steady; "
        f"cfg = NodeConfig.model_validate({{'node': {{'data_dir': {str(data_dir)!r}, "
        "'log_json': True}}); "
        "run(cfg, [StageSpec('steady', fake_steady)], RestartPolicy(stop_timeout_s=2))"
    )
    with logging_process([sys.executable, "-c", code]) as proc:
        _wait_for(lambda: len(_pids(data_dir, "steady")) == 1, "steady")
        err = stop_and_read(proc)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert lines, "no log lines"
    assert {line["stage"] for line in lines} <= {"supervisor", "steady"}
    assert any("all stages stopped" in line["msg"] for line in lines)


# ------------------------------------------------------------------- unit tests


def test_default_stages_follow_the_config() -> None:
    cfg = NodeConfig.model_validate({"inference": {"workers": 3}, "http": {"enabled": False}})
    stages = {s.name: s for s in default_stages(cfg)}
    assert set(stages) == {"receiver", "scheduler", "worker", "sender"}
    assert stages["worker"].replicas == 3
    assert stages["worker"].target == "node.work.worker:run"
    with_http = default_stages(NodeConfig())
    assert "http" in {s.name for s in with_http}


def test_stage_spec_and_policy_validate() -> None:
    with pytest.raises(ValueError, match="target"):
        StageSpec("x", "no_colon")
    with pytest.raises(ValueError, match="replicas"):
        StageSpec("x", "a:b", replicas=0)
    with pytest.raises(ValueError, match="name"):
        StageSpec("bad name", "a:b")
    with pytest.raises(ValueError, match="crash_loop_count"):
        RestartPolicy(crash_loop_count=0)
    policy = RestartPolicy(base_delay_s=1.0, max_delay_s=5.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_status_path_is_under_data_dir(tmp_path: Path) -> None:
    cfg = NodeConfig.model_validate({"node": {"data_dir": str(tmp_path)}})
    assert stage_status_path(cfg).is_relative_to(tmp_path)
    assert read_stage_status(stage_status_path(cfg)) is None


# ------------------------------------------------- the real stages, end to end


@pytest.mark.integration
@pytest.mark.slow
def test_airnode_serve_with_real_stages(tmp_path: Path) -> None:
    """`airnode serve` runs every real stage, takes a demo study, and stops cleanly."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    from node.config import load_config
    from node.ops.demo import run_demo
    from tests.conftest import free_port

    dicom_port, http_port = free_port(), free_port()
    conf = tmp_path / "node.toml"
    conf.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\nport = {dicom_port}\nlog_json = true\n'
        f"[study]\nstable_after_s = 0.5\n[http]\nport = {http_port}\n",
        encoding="utf-8",
    )
    cfg = load_config(conf)
    base = f"http://127.0.0.1:{http_port}"
    with logging_process(
        [sys.executable, "-m", "node.ops.cli", "serve", "--config", str(conf)]
    ) as proc:

        def all_running() -> bool:
            try:
                body = requests.get(base + "/health", timeout=2).json()
            except (requests.ConnectionError, ValueError):
                return False
            stages = body["checks"]["stages"]["stages"]
            return set(stages) == {"receiver", "scheduler", "worker", "sender", "http"} and all(
                s["state"] == "running" for s in stages.values()
            )

        _wait_for(all_running, "every stage running", timeout=90)
        assert requests.get(base + "/health", timeout=5).status_code == 200
        status = read_stage_status(stage_status_path(cfg))
        assert status is not None
        stage_pids = [s["pid"] for s in status["stages"].values()]

        from node.dimse import echo

        # "running" means the process is alive; the receiver listens a moment later.
        _wait_for(
            lambda: echo("127.0.0.1", dicom_port, ae_title="AIRNODE", timeout=2) == 0,
            "the receiver to answer C-ECHO",
        )
        report = run_demo(cfg, dx=1, ct=1, seed=7, slices=8, dx_size=64, ct_size=48)
        assert report.ok and report.stored == 9

        def unrouted() -> bool:
            fams = text_string_to_metric_families(requests.get(base + "/metrics", timeout=5).text)
            values = {
                (s.name, tuple(sorted(s.labels.items()))): s.value for f in fams for s in f.samples
            }
            return (
                values.get(("airnode_instances_received_total", ())) == 9
                and values.get(("airnode_studies", (("state", "unrouted"),))) == 2
            )

        _wait_for(unrouted, "both demo studies marked unrouted (no route configured)")
        page = requests.get(base + "/", timeout=5).text
        assert page.count('<tr class="study" data-state="unrouted"') == 2

        err = stop_and_read(proc, 60)
    assert proc.returncode == 0, err[-3000:]
    assert not any(_alive(p) for p in stage_pids)
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # all JSON
    assert any(line["msg"] == "all stages stopped" for line in lines)
    assert "Doe^Jane" not in err and "Jane" not in err  # the synthetic patient's name


def test_serve_with_an_unusable_database_fails_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x", encoding="utf-8")
    conf = tmp_path / "node.toml"
    conf.write_text(
        f'[node]\ndata_dir = "{tmp_path}"\n'
        f'database_url = "sqlite:///{blocker / "airnode.sqlite"}"\n',
        encoding="utf-8",
    )
    res = subprocess.run(
        [sys.executable, "-m", "node.ops.cli", "serve", "--config", str(conf)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "cannot open or migrate the database (sqlite)" in lines[0]
    assert "Traceback" not in res.stderr
