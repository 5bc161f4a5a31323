"""The HTTP stage: /health, /metrics and the status page against a populated job table."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import update

from node.config import NodeConfig
from node.logs import uid_tag
from node.ops.http import make_server
from node.ops.http.page import scrub
from node.ops.http.preview import render_png
from node.ops.supervisor import stage_status_path, write_stage_status
from node.store import jobs
from node.store.db import Database, Instance, Job, JobKind, Result, Study, StudyState, now
from tests.conftest import free_port, require_tool
from tests.peers import logging_process, stop_and_read

REPO = Path(__file__).resolve().parents[3]
PATIENT = "Qwertzuiop^Phiname"  # must never appear on any page
POLICY = jobs.RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.02)


# ------------------------------------------------------------------------ data


def _sc_file(path: Path, study_uid: str, size: tuple[int, int] = (64, 96)) -> None:
    """An RGB secondary capture with a red blob, like the worker's heatmap overlays."""
    rows, cols = size
    arr = np.zeros((rows, cols, 3), np.uint8)
    arr[..., 2] = 80
    arr[rows // 4 : rows // 2, cols // 4 : cols // 2, 0] = 255
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.PatientName = PATIENT
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@dataclass
class Populated:
    dx_study: str
    ct_study: str
    sc_id: int
    sr_id: int
    t0: float


def _populate(db: Database, outbox: Path) -> Populated:
    """Two studies (DX 1 image, CT 3 slices), infer and send jobs in every state, results."""
    t0 = now() - 600.0
    dx, ct = generate_uid(), generate_uid()
    with db.session() as s:
        for study, mod, n in ((dx, "DX", 1), (ct, "CT", 3)):
            series = generate_uid()
            for i in range(n):
                s.add(
                    Instance(
                        sop_instance_uid=generate_uid(),
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                        study_instance_uid=study,
                        series_instance_uid=series,
                        modality=mod,
                        transfer_syntax_uid=ExplicitVRLittleEndian,
                        path=f"{mod}/{i}.dcm",
                        sha256="0" * 64,
                        size=1000,
                        calling_ae="SCANNER",
                        peer_host="127.0.0.1",
                        received_at=t0,
                    )
                )
        s.add(
            Study(
                study_instance_uid=dx,
                first_received_at=t0,
                last_received_at=t0,
                state=StudyState.SCHEDULED,
                instance_count=1,
                note=f"routed for {PATIENT}",
            )
        )
        s.add(
            Study(
                study_instance_uid=ct,
                first_received_at=t0,
                last_received_at=t0,
                state=StudyState.UNROUTED,
                instance_count=3,
                purged_at=t0 + 60,
            )
        )

    # infer: one done with timings, one running, one dead
    timings = {"load": 0.02, "preprocess": 0.03, "inference": 0.4, "encode": 0.1, "total": 0.6}
    jid, _ = jobs.enqueue(
        db, JobKind.INFER, "i1", {"model": "cxr-nodule", "patient": PATIENT}, study_instance_uid=dx
    )
    job = jobs.claim(db, JobKind.INFER, "w1")
    assert job is not None and job.id == jid
    jobs.complete(db, jid, "w1", payload={"model": "cxr-nodule", "timings": timings})
    jobs.enqueue(
        db, JobKind.INFER, "i2", {"model": "ct-lesion"}, study_instance_uid=ct, priority=300
    )
    assert jobs.claim(db, JobKind.INFER, "w1") is not None
    jobs.enqueue(db, JobKind.INFER, "i3", {"model": "ct-lesion"}, study_instance_uid=ct)
    jobs.cancel(db, 3, f"input unreadable for {PATIENT} study {ct}")

    # results: an SC with a file, an SR
    sc_uid, sr_uid = generate_uid(), generate_uid()
    _sc_file(outbox / "ab" / "sc.dcm", dx)
    with db.session() as s:
        sc = Result(
            sop_instance_uid=sc_uid,
            sop_class_uid=SecondaryCaptureImageStorage,
            study_instance_uid=dx,
            kind="sc",
            model="cxr-nodule",
            path="ab/sc.dcm",
            infer_job_id=jid,
            created_at=now(),
        )
        sr = Result(
            sop_instance_uid=sr_uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            study_instance_uid=dx,
            kind="sr",
            model="cxr-nodule",
            path="ab/sr.dcm",
            infer_job_id=jid,
            created_at=now(),
        )
        s.add_all([sc, sr])
        s.flush()
        sc_id, sr_id = sc.id, sr.id

    # send: sc done after 2 attempts (1 failure), sr dead after 3 failed attempts
    s1, _ = jobs.enqueue(db, JobKind.SEND, "s1", {"destination": "pacs"}, study_instance_uid=dx)
    s2, _ = jobs.enqueue(db, JobKind.SEND, "s2", {"destination": "pacs"}, study_instance_uid=dx)
    j = jobs.claim(db, JobKind.SEND, "snd")
    assert j is not None and j.id == s1
    jobs.fail(db, j, "snd", jobs.TransientJobError("association refused"), POLICY)
    with db.session() as s:  # make the retry due now
        s.execute(update(Job).where(Job.id == s1).values(not_before=0.0))
    j = jobs.claim(db, JobKind.SEND, "snd")
    assert j is not None and j.id == s1
    jobs.complete(db, s1, "snd")
    with db.session() as s:  # time to result: 7 s after the last image
        s.execute(update(Job).where(Job.id == s1).values(finished_at=t0 + 7.0))
    for _ in range(3):
        with db.session() as s:
            s.execute(update(Job).where(Job.id == s2).values(not_before=0.0))
        j = jobs.claim(db, JobKind.SEND, "snd")
        assert j is not None and j.id == s2
        jobs.fail(db, j, "snd", jobs.TransientJobError("0xA700 out of resources"), POLICY)
    return Populated(dx_study=dx, ct_study=ct, sc_id=sc_id, sr_id=sr_id, t0=t0)


# --------------------------------------------------------------------- fixtures


@dataclass
class Served:
    url: str
    cfg: NodeConfig
    data: Populated
    db: Database

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=10)


def _cfg(tmp_path: Path, **http: Any) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "node": {"data_dir": str(tmp_path / "data")},
            "http": {"host": "127.0.0.1", "port": free_port(), **http},
            "security": {"min_free_bytes": 0},
        }
    )


@pytest.fixture
def served(db: Database, tmp_path: Path) -> Iterator[Served]:
    cfg = _cfg(tmp_path)
    cfg.node.data_dir.mkdir(parents=True)
    data = _populate(db, cfg.node.outbox_dir)
    server = make_server(cfg, db)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{cfg.http.port}", cfg, data, db)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# ----------------------------------------------------------------------- health


def test_health_ok_without_supervisor(served: Served) -> None:
    r = served.get("/health")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == {"ok": True}
    assert body["checks"]["disk"]["free_bytes"] > 0
    assert body["checks"]["stages"]["supervisor"] == "absent"


def test_health_reports_stages_and_fails_on_crash_loop(served: Served) -> None:
    path = stage_status_path(served.cfg)
    stages = {"receiver": {"state": "running", "pid": 10, "restarts": 0}}
    write_stage_status(path, {"updated_at": time.time(), "stopped": False, "stages": stages})
    r = served.get("/health")
    assert r.status_code == 200
    assert r.json()["checks"]["stages"]["stages"]["receiver"]["state"] == "running"

    stages["sender"] = {"state": "fatal", "pid": None, "restarts": 4}
    write_stage_status(path, {"updated_at": time.time(), "stopped": False, "stages": stages})
    r = served.get("/health")
    assert r.status_code == 503
    assert "sender" in r.json()["checks"]["stages"]["error"]

    stages.pop("sender")
    write_stage_status(path, {"updated_at": time.time() - 3600, "stopped": False, "stages": stages})
    r = served.get("/health")
    assert r.status_code == 503
    assert r.json()["checks"]["stages"]["supervisor"] == "stale"


def test_health_fails_when_disk_reserve_not_met_or_db_unreachable(
    db: Database, tmp_path: Path
) -> None:
    from node.ops.http.health import health

    data_dir = tmp_path
    code, body = health(db, data_dir, 1 << 62, lambda: None)
    assert code == 503
    assert body["checks"]["disk"]["ok"] is False
    assert "0xA700" in body["checks"]["disk"]["error"]

    broken = Database(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.sqlite'}")
    try:
        code, body = health(broken, data_dir, 0, lambda: None)
    finally:
        broken.dispose()
    assert code == 503
    assert body["checks"]["database"]["ok"] is False
    assert body["checks"]["disk"]["ok"] is True


# ---------------------------------------------------------------------- metrics


def test_metrics_reflect_the_job_table(served: Served) -> None:
    r = served.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    m = _metrics(r.text)

    assert m[("airnode_instances_received_total", ())] == 4
    assert m[("airnode_instances_received_bytes_total", ())] == 4000
    assert m[("airnode_studies", (("state", "scheduled"),))] == 1
    assert m[("airnode_studies", (("state", "unrouted"),))] == 1
    assert m[("airnode_studies", (("state", "receiving"),))] == 0
    assert m[("airnode_jobs", (("kind", "infer"), ("status", "done")))] == 1
    assert m[("airnode_jobs", (("kind", "infer"), ("status", "running")))] == 1
    assert m[("airnode_jobs", (("kind", "infer"), ("status", "dead")))] == 1
    assert m[("airnode_jobs", (("kind", "send"), ("status", "done")))] == 1
    assert m[("airnode_jobs", (("kind", "send"), ("status", "dead")))] == 1
    assert m[("airnode_results", (("kind", "sc"),))] == 1
    assert m[("airnode_results", (("kind", "sr"),))] == 1
    # 1 failed attempt before the sc went through + 3 of the dead sr
    assert m[("airnode_send_failures_total", ())] == 4
    assert m[("airnode_send_dead_jobs", ())] == 1
    assert m[("airnode_database_up", ())] == 1

    inf = (("model", "cxr-nodule"), ("phase", "inference"))
    assert m[("airnode_inference_seconds_count", inf)] == 1
    assert m[("airnode_inference_seconds_sum", inf)] == pytest.approx(0.4)
    assert m[("airnode_inference_seconds_bucket", (("le", "0.25"), *inf))] == 0
    assert m[("airnode_inference_seconds_bucket", (("le", "0.5"), *inf))] == 1
    total = (("model", "cxr-nodule"), ("phase", "total"))
    assert m[("airnode_inference_seconds_sum", total)] == pytest.approx(0.6)

    assert m[("airnode_time_to_result_seconds_count", ())] == 1
    assert m[("airnode_time_to_result_seconds_sum", ())] == pytest.approx(7.0)
    assert m[("airnode_time_to_result_seconds_bucket", (("le", "5.0"),))] == 0
    assert m[("airnode_time_to_result_seconds_bucket", (("le", "10.0"),))] == 1


def test_metrics_ignore_malformed_timings_and_pending_sends(db: Database, tmp_path: Path) -> None:
    from node.ops.http.metrics import JobTableCollector, render_metrics

    for key, payload in (
        ("a", {"model": "m", "timings": {"total": "fast", "Bad Key": 1.0, "inference": -1}}),
        ("b", {"model": "m"}),
        ("c", {"model": "m", "timings": {"inference": 2.5}}),
    ):
        jobs.enqueue(db, JobKind.INFER, key, payload)
        j = jobs.claim(db, JobKind.INFER, "w")
        assert j is not None
        jobs.complete(db, j.id, "w", payload=payload)
    uid = generate_uid()
    with db.session() as s:
        s.add(Study(study_instance_uid=uid, first_received_at=0.0, last_received_at=1.0))
    jobs.enqueue(db, JobKind.SEND, "s1", {}, study_instance_uid=uid)
    jobs.enqueue(db, JobKind.SEND, "s2", {}, study_instance_uid=uid)
    j = jobs.claim(db, JobKind.SEND, "snd")
    assert j is not None
    jobs.complete(db, j.id, "snd")  # the other send of the study is still queued

    m = _metrics(render_metrics(JobTableCollector(db, data_dir=tmp_path)).decode())
    phases = {dict(k[1])["phase"] for k in m if k[0] == "airnode_inference_seconds_count"}
    assert phases == {"inference"}
    assert m[("airnode_inference_seconds_count", (("model", "m"), ("phase", "inference")))] == 1
    assert m[("airnode_time_to_result_seconds_count", ())] == 0
    assert m[("airnode_disk_free_bytes", ())] > 0
    assert m[("airnode_job_oldest_waiting_seconds", (("kind", "send"),))] >= 0


def test_metrics_say_when_the_database_is_down(tmp_path: Path) -> None:
    from node.ops.http.metrics import JobTableCollector, render_metrics

    broken = Database(f"sqlite:///{tmp_path / 'missing' / 'x.sqlite'}")
    try:
        text = render_metrics(JobTableCollector(broken)).decode()
    finally:
        broken.dispose()
    assert _metrics(text)[("airnode_database_up", ())] == 0


# ------------------------------------------------------------ page and preview


def test_status_page_lists_studies_jobs_and_previews(served: Served) -> None:
    r = served.get("/")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" in r.headers["Content-Security-Policy"]
    page = r.text
    assert page.count('<tr class="study"') == 2
    assert page.count('<tr class="job"') == 5
    assert page.count('<td class="prio">stat</td>') == 1  # the STAT job, by its priority
    assert page.count('<td class="prio">routine</td>') == 4
    assert page.count('<span class="purged">') == 1  # retention removed its instances
    assert f'src="/preview/{served.data.sc_id}.png"' in page
    assert f"/preview/{served.data.sr_id}.png" not in page  # an SR has no preview
    assert uid_tag(served.data.dx_study) in page
    assert "0xA700 out of resources" in page
    assert 'http-equiv="refresh"' in page


def test_preview_is_a_png_of_the_sc(served: Served) -> None:
    r = served.get(f"/preview/{served.data.sc_id}.png")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.size == (96, 64)
    red = np.asarray(img.convert("RGB"))[20, 30]
    assert tuple(red) == (255, 0, 80)


@pytest.mark.parametrize(
    "path", ["/preview/999.png", "/preview/abc.png", "/preview/../../etc/passwd", "/nope"]
)
def test_unknown_paths_are_404(served: Served, path: str) -> None:
    assert served.get(path).status_code == 404


def test_preview_refuses_non_images_and_paths_outside_the_outbox(served: Served) -> None:
    assert served.get(f"/preview/{served.data.sr_id}.png").status_code == 404
    with served.db.session() as s:
        s.execute(update(Result).where(Result.id == served.data.sc_id).values(path="../../x.dcm"))
    r = served.get(f"/preview/{served.data.sc_id}.png")
    assert r.status_code == 404
    assert "outside the outbox" in r.text


def test_writes_are_refused(served: Served) -> None:
    r = requests.post(served.url + "/health", data=b"x", timeout=10)
    assert r.status_code == 405
    assert r.headers["Allow"] == "GET, HEAD"


def test_render_png_downscales_large_images(tmp_path: Path) -> None:
    _sc_file(tmp_path / "big.dcm", generate_uid(), size=(1000, 800))
    img = Image.open(io.BytesIO(render_png(tmp_path / "big.dcm", max_px=200)))
    assert max(img.size) == 200


def test_no_phi_on_any_page(served: Served) -> None:
    """The patient name is in the SC file, a job payload, a job error and a study note."""
    bodies = [served.get(p).text for p in ("/", "/health", "/metrics")]
    for body in bodies:
        assert "Qwertzuiop" not in body
        assert "Phiname" not in body
        assert served.data.dx_study not in body
        assert served.data.ct_study not in body


def test_scrub_masks_names_and_uids_and_escaping_holds(served: Served) -> None:
    assert scrub("stored 1.2.3.4.5 from X") == f"stored {uid_tag('1.2.3.4.5')} from X"
    masked = scrub("failed for Doe^John")
    assert "Doe" not in masked and "John" not in masked and "<name>" in masked
    evil = "<script>alert(1)</script>"
    jobs.enqueue(served.db, JobKind.SEND, "evil", {"destination": evil})
    page = served.get("/").text
    assert evil not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# ----------------------------------------------------------- headless browser


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    exe = require_tool("chromium")
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp}",
            "--window-size=1280,900",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_status_page_in_headless_chromium(served: Served, tmp_path: Path) -> None:
    dom = _chromium(served.url + "/", tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert html.count('<tr class="study"') == 2
    assert f"{uid_tag(served.data.ct_study)}" in html
    # the browser fetched the PNG and decoded it (the hashed onload handler ran under CSP)
    assert f'src="/preview/{served.data.sc_id}.png"' in html
    assert 'data-state="loaded"' in html, html[html.find("<figure") :][:600]
    assert "Qwertzuiop" not in html

    shot = tmp_path / "status.png"
    res = _chromium(served.url + "/", tmp_path / "profile2", f"--screenshot={shot}")
    assert res.returncode == 0, res.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (900, 1280, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10  # text and the heatmap, not blank
    # the heatmap's pure red blob made it onto the screen
    assert bool(((img[..., 0] == 255) & (img[..., 1] == 0) & (img[..., 2] == 80)).any())


# ----------------------------------------------------- the stage under a supervisor


def test_http_stage_under_the_supervisor(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    code = (
        "from node.config import NodeConfig; from node.ops.supervisor import run, StageSpec; "
        f"cfg = NodeConfig.model_validate_json({cfg.model_dump_json()!r}); "
        "run(cfg, [StageSpec('http', 'node.ops.http:run')])"
    )
    with logging_process([sys.executable, "-c", code]) as proc:
        body = _poll_health(
            f"http://127.0.0.1:{cfg.http.port}/health",
            lambda b: b["checks"]["stages"]["stages"].get("http", {}).get("state") == "running",
        )
        assert body["status"] == "ok"
        assert body["checks"]["stages"]["supervisor"] == "running"
        err = stop_and_read(proc)
    assert proc.returncode == 0, err
    assert "http: stopped" in err
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{cfg.http.port}/health", timeout=2)


def _poll_health(url: str, cond: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(url, timeout=2)
            last = r.json()
            if cond(last):
                return dict(last)
        except (requests.ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"health never matched; last: {last}")


def test_inference_histogram_is_incremental_across_scrapes(db: Database) -> None:
    """Each finished run is observed once, however often Prometheus scrapes."""
    from node.ops.http.metrics import JobTableCollector, render_metrics

    def finish(key: str) -> int:
        jobs.enqueue(db, JobKind.INFER, key, {"model": "m"})
        j = jobs.claim(db, JobKind.INFER, "w")
        assert j is not None
        jobs.complete(db, j.id, "w", payload={"model": "m", "timings": {"total": 1.5}})
        return j.id

    collector = JobTableCollector(db)
    key = ("airnode_inference_seconds_count", (("model", "m"), ("phase", "total")))

    def count() -> float:
        return _metrics(render_metrics(collector).decode()).get(key, 0.0)

    first = finish("a")
    assert count() == 1
    assert count() == 1  # a second scrape adds nothing
    finish("b")
    assert count() == 2
    jobs.retry(db, first)  # an operator re-runs job a: a new observation when it ends
    j = jobs.claim(db, JobKind.INFER, "w")
    assert j is not None and j.id == first
    jobs.complete(db, first, "w", payload={"model": "m", "timings": {"total": 1.5}})
    assert count() == 3
    assert count() == 3
    # a fresh collector (HTTP stage restarted) counts what the table holds now
    assert _metrics(render_metrics(JobTableCollector(db)).decode())[key] == 2
