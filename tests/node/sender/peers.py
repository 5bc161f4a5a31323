"""Real DICOM peers for the sender tests: dcmtk storescp (with fault flags) and Orthanc.

Every peer listens on 127.0.0.1 only, is started by a context manager and killed in
``finally``; a peer that does not come up within its timeout fails the test.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from tests.conftest import require_tool


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextmanager
def storescp(
    port: int, out_dir: Path, *flags: str, aet: str = "STORESCP", accept_all: bool = True
) -> Iterator[Path]:
    """dcmtk storescp; ``+uf`` names files uniquely, so a duplicate is a second file.

    ``accept_all=False`` leaves storescp at its default: uncompressed syntaxes only.
    """
    exe = require_tool("storescp")
    out_dir.mkdir(parents=True, exist_ok=True)
    syntaxes = ["+xa"] if accept_all else []
    proc = subprocess.Popen(
        [exe, "-aet", aet, "-od", str(out_dir), "+uf", *syntaxes, *flags, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield out_dir
    finally:
        _stop(proc)


def received(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.iterdir() if p.is_file()) if out_dir.exists() else []


@contextmanager
def orthanc(tmp: Path, dicom_port: int, http_port: int) -> Iterator[str]:
    """Orthanc with a generated configuration; yields its REST base URL."""
    exe = require_tool("Orthanc")
    tmp.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "airnode-test",
        "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "storage"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {"airnode": ["AIRNODE", "127.0.0.1", 104]},
        "Plugins": [],
        "StableAge": 1,
    }
    cfg_path = tmp / "orthanc.json"
    cfg_path.write_text(json.dumps(config))
    log = open(tmp / "orthanc.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([exe, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/system", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: see {tmp / 'orthanc.log'}")
            time.sleep(0.1)
        wait_port(dicom_port)
        yield base
    finally:
        _stop(proc)
        log.close()
