"""End to end: a scanner (dcmtk storescu) and a PACS (Orthanc) around ``airnode serve``.

The node runs as a subprocess with its real stages (receiver, scheduler, worker,
sender, HTTP), ONNX Runtime on the CPU, and Orthanc as its only destination.  Three
studies reach it: a DX and a CT sent by ``storescu``, and a DX that Orthanc itself
routes to the node through its REST API (``/modalities/airnode/store``).  The test
then asks Orthanc, not the node, whether every source study holds the node's SR and
heatmap secondary captures (and a SEG for the CT), downloads each result and runs
``dciodvfy`` on it.  An MR study that matches no route must create no job and be
shown as unrouted.  SIGTERM must stop the node with exit code 0.

Tiny untrained nets are exported into a temporary package folder (same names, same
tasks, made to always report): this test checks the plumbing (every result object
reaches the PACS and validates), not a model's accuracy.  The shipped demo models'
accuracy is measured on their own (``tests/training/test_shipped_models.py``,
``docs/evaluation/external``); the 2.0.0 models miss the demo phantoms' lesions too
often to guarantee a heatmap and a SEG here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pydicom import Dataset, dcmread
from pydicom.uid import MRImageStorage
from sqlalchemy import select

from node.ops.demo import demo_studies
from node.ops.synthetic import ct_series, write_series
from node.store.db import Database, Job, JobKind, JobStatus, Result, Study, StudyState
from tests.conftest import free_port
from tests.dicom_checks import assert_dciodvfy_clean, dsr2html
from tests.peers import (
    REPO,
    airnode_serve,
    orthanc,
    received,
    storescp,
    storescu,
    tiny_onnx_packages,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

STABLE_S = 2.0
#: Stable wait plus slack: the node also starts its stages and loads both models, and
#: the suite may share 2 CPU cores with other jobs (typical: 5-11 s in all).
RESULT_DEADLINE_S = STABLE_S + 60.0
SR, SC, SEG, GSPS = (
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.11.1",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx_packages(tmp_path_factory.mktemp("packages"))


def mr_study(folder: Path) -> list[Path]:
    """A small MR series: no route matches MR."""
    series = ct_series(n_slices=2, rows=32, cols=32, seed=77)
    for ds in series:
        ds.Modality = "MR"
        ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        for kw in ("RescaleType", "KVP"):
            if kw in ds:
                delattr(ds, kw)
    return write_series(series, folder)


def node_config(
    tmp: Path,
    model_dir: Path,
    node_port: int,
    http_port: int,
    pacs_port: int,
    pacs_ae: str = "ORTHANC",
) -> Path:
    return write_config(
        tmp / "airnode.toml",
        {
            "node": {
                "ae_title": "AIRNODE",
                "port": node_port,
                "data_dir": str(tmp / "data"),
                "log_json": True,
            },
            "study": {"stable_after_s": STABLE_S, "force_after_s": 600.0},
            "inference": {
                "backend": "onnxruntime",
                "model_dirs": [str(model_dir)],
                "intra_op_threads": 2,
            },
            "http": {"enabled": True, "port": http_port},
            "send": {"base_delay_s": 0.5, "max_delay_s": 5.0},
            "destinations": [
                {"name": "orthanc", "ae_title": pacs_ae, "host": "127.0.0.1", "port": pacs_port}
            ],
            "routes": [
                {
                    "name": "chest-radiographs",
                    "model": "cxr-nodule",
                    "match": {"Modality": ["DX", "CR"]},
                    "send_to": ["orthanc"],
                },
                {
                    "name": "ct",
                    "model": "ct-lesion",
                    "match": {"Modality": ["CT"]},
                    "send_to": ["orthanc"],
                },
            ],
        },
    )


def orthanc_study(base: str, study_uid: str) -> str | None:
    r = requests.post(f"{base}/tools/lookup", data=study_uid, timeout=10)
    r.raise_for_status()
    hits = [h["ID"] for h in r.json() if h["Type"] == "Study"]
    return hits[0] if hits else None


def orthanc_instances_by_class(base: str, study_id: str) -> dict[str, list[str]]:
    """Orthanc instance IDs in a study, grouped by SOP Class UID."""
    out: dict[str, list[str]] = defaultdict(list)
    for inst in requests.get(f"{base}/studies/{study_id}/instances", timeout=10).json():
        meta = requests.get(f"{base}/instances/{inst['ID']}/metadata/SopClassUid", timeout=10)
        meta.raise_for_status()
        out[meta.text.strip()].append(inst["ID"])
    return out


@pytest.fixture
def peers(tmp_path: Path, model_dir: Path) -> Iterator[tuple[str, Path, int, int, int]]:
    pacs_dicom, pacs_http, node_port, http_port = (free_port() for _ in range(4))
    modalities = {"airnode": ("AIRNODE", "127.0.0.1", node_port)}
    with orthanc(tmp_path / "orthanc", pacs_dicom, pacs_http, modalities) as base:
        cfg = node_config(tmp_path, model_dir, node_port, http_port, pacs_dicom)
        yield base, cfg, node_port, http_port, pacs_dicom


def test_scanner_and_pacs_around_airnode_serve(
    tmp_path: Path, peers: tuple[str, Path, int, int, int]
) -> None:
    base, cfg_path, node_port, http_port, _ = peers
    studies: dict[str, list[Dataset]] = {}
    (dx_mod, _, dx), (ct_mod, _, ct) = list(
        demo_studies(dx=1, ct=1, slices=40, seed=11, dx_size=512, ct_size=256)
    )
    assert (dx_mod, ct_mod) == ("DX", "CT")
    studies["scanner-dx"], studies["scanner-ct"] = dx, ct
    (_, _, routed) = next(demo_studies(dx=1, ct=0, seed=12, dx_size=384))
    studies["pacs-dx"] = routed
    dx_files = write_series(dx, tmp_path / "in" / "dx")
    ct_files = write_series(ct, tmp_path / "in" / "ct")
    routed_files = write_series(routed, tmp_path / "in" / "routed")
    mr_files = mr_study(tmp_path / "in" / "mr")
    mr_uid = str(dcmread(mr_files[0], stop_before_pixels=True).StudyInstanceUID)

    # The PACS already holds the third study; it will route it to the node.
    for f in routed_files:
        requests.post(f"{base}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
    routed_id = orthanc_study(base, str(routed[0].StudyInstanceUID))
    assert routed_id is not None

    log_path = tmp_path / "airnode.log"
    with airnode_serve(cfg_path, log_path, ready_port=node_port) as node:
        for files in (dx_files, ct_files, mr_files):
            done = storescu(node_port, files)
            assert done.returncode == 0, done.stdout + done.stderr
        r = requests.post(
            f"{base}/modalities/airnode/store", data=routed_id, timeout=60
        )  # synchronous C-STORE from Orthanc to the node
        r.raise_for_status()
        t_last_image = time.monotonic()

        # Wait until Orthanc holds, in every source study, an SR, an SC and a GSPS (and a SEG
        # for the CT) — asked of the PACS, not of the node.
        want = {
            "scanner-dx": {SR, SC, GSPS},
            "pacs-dx": {SR, SC, GSPS},
            "scanner-ct": {SR, SC, SEG, GSPS},
        }
        found: dict[str, dict[str, list[str]]] = {}
        deadline = t_last_image + RESULT_DEADLINE_S
        while True:
            for name, needed in want.items():
                sid = orthanc_study(base, str(studies[name][0].StudyInstanceUID))
                by_class = orthanc_instances_by_class(base, sid) if sid else {}
                if needed <= set(by_class):
                    found[name] = by_class
            if len(found) == len(want):
                break
            assert node.poll() is None, f"airnode serve exited: see {log_path}"
            assert time.monotonic() < deadline, (
                f"after {RESULT_DEADLINE_S:.0f} s Orthanc holds results for "
                f"{sorted(found)} only; node log: {log_path}"
            )
            time.sleep(0.5)
        elapsed = time.monotonic() - t_last_image
        print(f"results in Orthanc {elapsed:.1f} s after the last image")

        # Each result object: in the source study, exactly as many as the node made,
        # and dciodvfy-clean as the PACS stores it.
        db = Database(f"sqlite:///{tmp_path / 'data' / 'airnode.sqlite'}")
        try:
            deadline = time.monotonic() + 60
            while True:  # the last send job's row may lag Orthanc's index by a moment
                with db.read() as s:
                    sends = s.scalars(select(Job).where(Job.kind == JobKind.SEND)).all()
                    made = s.scalars(select(Result)).all()
                if sends and all(j.status == JobStatus.DONE for j in sends):
                    break
                assert time.monotonic() < deadline, [(j.id, j.status, j.last_error) for j in sends]
                time.sleep(0.5)
            with db.read() as s:
                infer = s.scalars(select(Job).where(Job.kind == JobKind.INFER)).all()
                mr_row = s.scalar(select(Study).where(Study.study_instance_uid == mr_uid))
        finally:
            db.dispose()
        assert len(infer) == 3 and all(j.status == JobStatus.DONE for j in infer)
        assert {str(j.payload["model"]) for j in infer} == {"cxr-nodule", "ct-lesion"}
        assert len(sends) == len(made)  # one destination
        for name, by_class in found.items():
            study_uid = str(studies[name][0].StudyInstanceUID)
            ours = [m for m in made if m.study_instance_uid == study_uid]
            assert sum(len(v) for k, v in by_class.items() if k in (SR, SC, SEG, GSPS)) == len(ours)
            for cls in (SR, SC, SEG, GSPS):
                for inst in by_class.get(cls, []):
                    dest = tmp_path / "from-orthanc" / f"{inst}.dcm"
                    dest.parent.mkdir(exist_ok=True)
                    got = requests.get(f"{base}/instances/{inst}/file", timeout=30)
                    got.raise_for_status()
                    dest.write_bytes(got.content)
                    assert_dciodvfy_clean(dest)
                    if cls == SR:
                        assert "Imaging Measurement Report" in dsr2html(dest)

        # The MR matched no route: no job, shown as unrouted in the table and on the page.
        assert mr_row is not None and mr_row.state == StudyState.UNROUTED
        assert mr_row.note and "no route matched" in mr_row.note
        assert all(j.study_instance_uid != mr_uid for j in infer)
        assert orthanc_study(base, mr_uid) is None  # nothing was sent anywhere for it
        page = requests.get(f"http://127.0.0.1:{http_port}/", timeout=10).text
        assert page.count('data-state="unrouted"') == 1
        unrouted_row = page.split('data-state="unrouted"')[1].split("</tr>")[0]
        assert "MR" in unrouted_row
        listed = subprocess.run(
            [
                str(Path(sys.executable).with_name("airnode")),
                "jobs",
                "list",
                "--json",
                "--config",
                str(cfg_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=True,
        )
        rows = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
        assert len(rows) == len(infer) + len(sends)
        assert all(r["payload"].get("study_instance_uid") != mr_uid for r in rows)

        # The worker's recorded timings reach /metrics, per model and phase.
        metrics = requests.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
        for model in ("cxr-nodule", "ct-lesion"):
            for phase in ("preprocess", "inference", "encode", "total"):
                count = f'airnode_inference_seconds_count{{model="{model}",phase="{phase}"}}'
                line = next((ln for ln in metrics.splitlines() if ln.startswith(count)), "")
                assert line and float(line.split()[-1]) >= 1, (count, line)

        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=30) == 0


def test_kill_9_of_the_worker_inside_serve_loses_and_duplicates_nothing(
    tmp_path: Path, model_dir: Path
) -> None:
    """The supervisor restarts a worker killed mid-job; the new worker requeues the
    job at once, and the PACS (storescp writing every C-STORE to its own file)
    receives each result exactly once."""
    pacs_port, node_port, http_port = free_port(), free_port(), free_port()
    cfg_path = node_config(tmp_path, model_dir, node_port, http_port, pacs_port, "PACS")
    ((_, _, ct),) = list(demo_studies(dx=0, ct=1, slices=60, seed=21, ct_size=512))
    files = write_series(ct, tmp_path / "in" / "ct")
    db_url = f"sqlite:///{tmp_path / 'data' / 'airnode.sqlite'}"
    with (
        storescp(pacs_port, tmp_path / "pacs", aet="PACS") as pacs_dir,
        airnode_serve(cfg_path, tmp_path / "airnode.log", ready_port=node_port) as node,
    ):
        done = storescu(node_port, files)
        assert done.returncode == 0, done.stdout + done.stderr
        db = Database(db_url)
        try:
            deadline = time.monotonic() + 120
            while True:  # the worker has claimed the CT's job
                with db.read() as s:
                    job = s.scalar(select(Job).where(Job.kind == JobKind.INFER))
                if job is not None and job.status == JobStatus.RUNNING:
                    break
                assert job is None or job.status != JobStatus.DONE, "finished before the kill"
                assert time.monotonic() < deadline, "the infer job was never claimed"
                time.sleep(0.05)
            assert job.lease_owner is not None
            victim = int(job.lease_owner.rsplit(":", 1)[1])
            os.kill(victim, signal.SIGKILL)

            deadline = time.monotonic() + 180
            while True:
                with db.read() as s:
                    infer = s.scalar(select(Job).where(Job.id == job.id))
                    sends = s.scalars(select(Job).where(Job.kind == JobKind.SEND)).all()
                    made = s.scalars(select(Result)).all()
                assert infer is not None
                if (
                    infer.status == JobStatus.DONE
                    and sends
                    and all(j.status == JobStatus.DONE for j in sends)
                ):
                    break
                assert infer.status != JobStatus.DEAD, infer.last_error
                assert time.monotonic() < deadline, (infer.status, infer.last_error)
                time.sleep(0.2)
        finally:
            db.dispose()
        assert infer.attempts == 2 and infer.lease_owner is None
        assert "expired" in (infer.last_error or "")
        stages = json.loads((tmp_path / "data" / "run" / "stages.json").read_text())
        assert stages["stages"]["worker"]["restarts"] >= 1
        # Each result reached the PACS once: no second file for any SOP Instance UID.
        got = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in received(pacs_dir)]
        assert sorted(got) == sorted(r.sop_instance_uid for r in made)
        assert len(got) == len(set(got)) == len(sends) >= 3
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=30) == 0
