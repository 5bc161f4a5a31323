"""DICOMweb in and out under ``airnode serve``: a study stored with dicomweb-client is
processed (fake backend) and its results reach Orthanc's DICOMweb plugin by STOW-RS;
``kill -9`` of the HTTP stage in the middle of an upload loses nothing acknowledged."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from node.store.db import Database, Instance, Job, JobKind, JobStatus
from node.store.durable import uid_path
from tests.conftest import free_port
from tests.node.results.sources import ct_series
from tests.peers import airnode_serve, fake_packages, orthanc, write_config

SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _stages(data: Path) -> dict[str, Any]:
    return dict(json.loads((data / "run" / "stages.json").read_text())["stages"])


def _wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = cond()
        except (OSError, ValueError, KeyError, requests.RequestException):
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.integration
def test_stow_in_results_out_by_stow_and_kill_9_of_the_http_stage(tmp_path: Path) -> None:
    node_port, http_port = free_port(), free_port()
    data = tmp_path / "data"
    with orthanc(tmp_path / "orthanc", free_port(), free_port(), dicomweb=True) as pacs:
        cfg = write_config(
            tmp_path / "airnode.toml",
            {
                "node": {"ae_title": "AIRNODE", "port": node_port, "data_dir": str(data)},
                "study": {"stable_after_s": 1.0, "force_after_s": 600.0},
                "inference": {
                    "backend": "fake",
                    "model_dirs": [str(fake_packages(tmp_path / "pkgs"))],
                },
                "http": {"enabled": True, "port": http_port},
                "security": {"min_free_bytes": 0},
                "send": {"base_delay_s": 0.5, "max_delay_s": 2.0},
                "destinations": [{"name": "vna", "kind": "dicomweb", "url": f"{pacs}/dicom-web"}],
                "routes": [
                    {
                        "name": "ct-from-dicomweb",
                        "model": "ct-lesion",
                        "match": {"Modality": ["CT"], "CallingAETitle": ["DICOMWEB"]},
                        "send_to": ["vna"],
                    }
                ],
            },
        )
        with airnode_serve(cfg, tmp_path / "airnode.log", ready_port=node_port) as node:
            base = f"http://127.0.0.1:{http_port}"
            _wait(lambda: requests.get(f"{base}/health", timeout=2).ok, 60, "no HTTP stage")
            # An upload that will never finish: headers and the start of a part.
            slow = socket.create_connection(("127.0.0.1", http_port), timeout=10)
            slow.sendall(
                b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
                b'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n\r\n'
                b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 128 + b"DICM"
                b"\x02\x00" * 30000
            )
            series = ct_series(4, 64)
            study = str(series[0].StudyInstanceUID)
            rsp = DICOMwebClient(f"{base}/dicomweb").store_instances(series)
            refs = rsp.ReferencedSOPSequence
            acknowledged = sorted(str(i.ReferencedSOPInstanceUID) for i in refs)
            assert acknowledged == sorted(str(d.SOPInstanceUID) for d in series)
            _wait(
                lambda: list((data / "spool" / "tmp" / "http").rglob("*.dcm")),
                30,
                "the unfinished upload is not being received",
            )

            http = _stages(data)["http"]
            os.kill(int(http["pid"]), signal.SIGKILL)
            slow.settimeout(10)
            assert slow.recv(100) == b""  # the unfinished upload got no answer
            slow.close()
            _wait(
                lambda: (
                    _stages(data)["http"]["restarts"] > http["restarts"]
                    and requests.get(f"{base}/health", timeout=2).ok
                ),
                60,
                "the HTTP stage was not restarted",
            )
            # Nothing acknowledged was lost; nothing of the cut upload stayed.
            db = Database(f"sqlite:///{data / 'airnode.sqlite'}")
            try:
                with db.read() as s:
                    rows = sorted(s.scalars(select(Instance.sop_instance_uid)))
                assert rows == acknowledged
                for uid in acknowledged:
                    assert (data / "spool" / uid_path(uid)).is_file()
                assert not list((data / "spool" / "tmp" / "http").rglob("*.dcm"))

                # The study is processed and its results go out by STOW-RS.
                def sr_in_pacs() -> bool:
                    r = requests.get(
                        f"{pacs}/dicom-web/studies/{study}/instances",
                        params={"SOPClassUID": SR},
                        timeout=5,
                    )
                    return r.status_code == 200 and bool(r.json())

                _wait(sr_in_pacs, 120, f"no SR in Orthanc; see {tmp_path / 'airnode.log'}")
                with db.read() as s:
                    infer = list(s.scalars(select(Job).where(Job.kind == JobKind.INFER)))
                    sends = list(s.scalars(select(Job).where(Job.kind == JobKind.SEND)))
                assert [j.status for j in infer] == [JobStatus.DONE]
                assert sends and {j.destination for j in sends} == {"vna"}
            finally:
                db.dispose()
            assert node.poll() is None
