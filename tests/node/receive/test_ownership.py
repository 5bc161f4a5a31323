"""Who owns the DICOM port, and how fast it is open again after a receiver crash."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import free_port
from tests.peers import REPO, airnode_serve, write_config

pytestmark = pytest.mark.integration


def _receive(cfg: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.ops.cli", "receive", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def _echo_ok(port: int) -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.network_timeout = 2
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="AIRNODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_a_port_held_by_another_program_is_refused_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "a.toml", {"node": {"port": port, "data_dir": tmp_path / "d"}})
    with socket.socket() as squatter:  # even one that allows port sharing
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        out = _receive(cfg)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr
    assert any(f"already listens on DICOM port {port}" in line for line in lines), out.stderr


def test_a_second_node_on_the_same_port_is_refused(tmp_path: Path) -> None:
    port = free_port()
    first = write_config(
        tmp_path / "first.toml",
        {"node": {"port": port, "data_dir": tmp_path / "one", "receiver_processes": 2}},
    )
    second = write_config(
        tmp_path / "second.toml", {"node": {"port": port, "data_dir": tmp_path / "two"}}
    )
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.ops.cli", "receive", "--config", str(first)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while not _echo_ok(port):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        out = _receive(second)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"another airnode already serves DICOM port {port}" in out.stderr
        assert _echo_ok(port)  # both replicas of the first node keep serving
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def test_the_receiver_is_back_within_a_second_or_so_after_a_crash_under_serve(
    tmp_path: Path,
) -> None:
    port = free_port()
    data = tmp_path / "data"
    cfg = write_config(
        tmp_path / "node.toml",
        {"node": {"port": port, "data_dir": data}, "http": {"enabled": False}},
    )
    status = data / "run" / "stages.json"
    with airnode_serve(cfg, tmp_path / "serve.log", ready_port=port):
        downtimes = []
        for _ in range(4):  # repeated crashes: the back-off must not grow to 30 s
            pid = json.loads(status.read_text())["stages"]["receiver"]["pid"]
            os.kill(pid, signal.SIGKILL)
            t = time.monotonic()
            while not _echo_ok(port):
                assert time.monotonic() - t < 30
                time.sleep(0.02)
            downtimes.append(time.monotonic() - t)
            deadline = time.monotonic() + 10
            while json.loads(status.read_text())["stages"]["receiver"]["pid"] in (pid, None):
                assert time.monotonic() < deadline
                time.sleep(0.1)
    log = (tmp_path / "serve.log").read_text()
    delays = [float(x.split("restarting in ")[1].split(" s")[0]) for x in log.splitlines()
              if "stage receiver exited" in x]  # fmt: skip
    assert len(delays) == 4 and max(delays) <= 0.5, delays
    # What is left is the start of a fresh interpreter (imports, bind): ~1 s on an idle
    # machine; generous here, as this machine runs other suites at the same time.
    assert max(downtimes) < 10, downtimes
    print("receiver downtime after kill -9 (s):", [round(d, 2) for d in downtimes])
