"""The sender against real peers: delivery, fault injection, recovery, crash, Orthanc."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from sqlalchemy import select

from node.config import DestinationConfig, NodeConfig, NodeSection, SendPolicyConfig
from node.deliver import Sender
from node.deliver.status import Outcome, classify, describe
from node.results import encode_all, store_results
from node.store import jobs
from node.store.db import AuditEvent, Database, Job, JobKind, JobStatus
from tests.conftest import free_port, require_tool
from tests.node.results.sources import classification, ct_series, dx_image, segmentation
from tests.peers import REPO, orthanc, received, storescp


def _cfg(tmp: Path, dests: dict[str, int], **send: float) -> NodeConfig:
    policy = {"base_delay_s": 0.1, "max_delay_s": 0.4, "lease_s": 30.0, **send}
    return NodeConfig(
        node=NodeSection(data_dir=tmp / "data"),
        send=SendPolicyConfig(**policy),  # type: ignore[arg-type]
        destinations=[
            DestinationConfig(
                name=name, ae_title=name.upper(), host="127.0.0.1", port=port, timeout_s=3.0
            )
            for name, port in dests.items()
        ],
    )


def _results(db: Database, cfg: NodeConfig, dests: list[str]) -> list[str]:
    series = ct_series(n=6, size=32)
    objects = encode_all(segmentation(series), series, cfg)
    store_results(
        db, cfg.node.outbox_dir, objects, model="nodule-net", infer_job_id=None, destinations=dests
    )
    return sorted(str(o.SOPInstanceUID) for o in objects)


def _jobs(db: Database, dest: str) -> list[Job]:
    with db.read() as s:
        return [
            j
            for j in s.scalars(select(Job).where(Job.kind == JobKind.SEND))
            if j.payload["destination"] == dest
        ]


def _uids(files: list[Path]) -> list[str]:
    return sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


@contextmanager
def _running(sender: Sender) -> Iterator[None]:
    stop = threading.Event()
    t = threading.Thread(target=sender.run, args=(stop,), kwargs={"housekeeping_s": 0.5})
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=30)
        assert not t.is_alive()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, Outcome.SUCCESS),
        (0xB000, Outcome.SUCCESS),
        (0xB007, Outcome.SUCCESS),
        (0xA700, Outcome.TRANSIENT),
        (0xA7FF, Outcome.TRANSIENT),
        (None, Outcome.TRANSIENT),
        (0x0110, Outcome.TRANSIENT),
        (0xA900, Outcome.PERMANENT),
        (0xC000, Outcome.PERMANENT),
        (0xC211, Outcome.PERMANENT),
        (0x0122, Outcome.PERMANENT),
    ],
)
def test_status_classification(status: int | None, outcome: Outcome) -> None:
    assert classify(status) is outcome
    assert describe(status)


@pytest.mark.integration
def test_delivers_everything_to_two_destinations_audits_and_cleans_up(
    db: Database, tmp_path: Path
) -> None:
    pa, pb = free_port(), free_port()
    cfg = _cfg(tmp_path, {"a": pa, "b": pb})
    uids = _results(db, cfg, ["a", "b"])
    sender = Sender(cfg, db, batch_size=3)
    with storescp(pa, tmp_path / "a", aet="A") as da, storescp(pb, tmp_path / "b", aet="B") as db_:
        for dest in cfg.destinations:
            while sender.send_batch(dest):
                pass
        assert _uids(received(da)) == uids
        assert _uids(received(db_)) == uids
    assert {j.status for j in _jobs(db, "a") + _jobs(db, "b")} == {JobStatus.DONE}
    with db.read() as s:
        sent = s.scalars(select(AuditEvent).where(AuditEvent.event == "sent")).all()
    assert sorted(str(e.sop_instance_uid) for e in sent) == sorted(uids * 2)
    assert {e.ae_title for e in sent} == {"A", "B"}
    sender.housekeeping()
    assert not list(cfg.node.outbox_dir.rglob("*.dcm"))


@pytest.mark.integration
@pytest.mark.slow
def test_down_destination_recovers_exactly_once_while_healthy_one_keeps_receiving(
    db: Database, tmp_path: Path
) -> None:
    p_down, p_ok = free_port(), free_port()
    cfg = _cfg(tmp_path, {"down": p_down, "ok": p_ok})
    first = _results(db, cfg, ["down", "ok"])
    sender = Sender(cfg, db, batch_size=4, poll_s=0.1)
    with storescp(p_ok, tmp_path / "ok", aet="OK") as d_ok, _running(sender):
        _wait(lambda: len(received(d_ok)) == len(first))
        _wait(lambda: all(j.attempts >= 2 for j in _jobs(db, "down")))
        assert {j.status for j in _jobs(db, "down")} <= {JobStatus.FAILED, JobStatus.RUNNING}
        assert "no association" in str(_jobs(db, "down")[0].last_error)
        # More results while "down" is still down: the healthy one keeps receiving.
        second = _results(db, cfg, ["down", "ok"])
        _wait(lambda: len(received(d_ok)) == len(first) + len(second))
        with storescp(p_down, tmp_path / "down", aet="DOWN") as d_down:
            _wait(lambda: all(j.status == JobStatus.DONE for j in _jobs(db, "down")))
            time.sleep(0.5)  # any duplicate would land now
            assert _uids(received(d_down)) == sorted(first + second)
    assert _uids(received(d_ok)) == sorted(first + second)


@pytest.mark.integration
def test_permanent_rejection_ends_dead_with_reason_and_retry_requeues(
    db: Database, tmp_path: Path
) -> None:
    port = free_port()
    cfg = _cfg(tmp_path, {"pacs": port})
    uids = _results(db, cfg, ["pacs"])
    sender = Sender(cfg, db)
    with storescp(port, tmp_path / "refusing", "--refuse"):
        while sender.send_batch(cfg.destinations[0]):
            pass
    dead = _jobs(db, "pacs")
    assert {j.status for j in dead} == {JobStatus.DEAD}
    assert all("rejected permanently" in str(j.last_error) for j in dead)
    for j in dead:  # what `airnode jobs retry` does
        jobs.retry(db, j.id)
    with storescp(port, tmp_path / "ok") as out:
        while sender.send_batch(cfg.destinations[0]):
            pass
        assert _uids(received(out)) == uids


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "reason"),
    [(("--abort-after",), "abort"), (("--sleep-during", "5"), "")],
    ids=["abort-after", "sleep-during"],
)
def test_transient_faults_back_off_then_deliver_exactly_once(
    db: Database, tmp_path: Path, flags: tuple[str, ...], reason: str
) -> None:
    port = free_port()
    cfg = _cfg(tmp_path, {"pacs": port})
    uid = _results(db, cfg, ["pacs"])
    dest = cfg.destinations[0].model_copy(update={"timeout_s": 1.0})
    cfg = cfg.model_copy(update={"destinations": [dest]})
    sender = Sender(cfg, db, batch_size=len(uid))
    with storescp(port, tmp_path / "faulty", *flags):
        sender.send_batch(dest)
    after = _jobs(db, "pacs")
    assert {j.status for j in after} == {JobStatus.FAILED}
    assert all(j.not_before > j.updated_at for j in after)  # backing off
    assert reason in str(after[0].last_error).lower()
    with storescp(port, tmp_path / "healthy") as out:
        _wait(
            lambda: (
                sender.send_batch(dest) == 0
                and all(j.status == JobStatus.DONE for j in _jobs(db, "pacs"))
            )
        )
        assert _uids(received(out)) == uid


def crashing_sender_main(cfg_json: str, db_url: str) -> None:
    """The sender stage, made to die right after the peer acknowledged a C-STORE and
    before the job is marked done (exit code 70), as a power cut there would."""
    import os

    def crash(self: Sender, dest: DestinationConfig, job: Job, status: int | str) -> None:
        assert status == 0x0000  # only a success reaches this point
        os._exit(70)

    Sender._done = crash  # type: ignore[method-assign]
    cfg = NodeConfig.model_validate_json(cfg_json)
    Sender(cfg, Database(db_url)).send_batch(cfg.destinations[0])


@pytest.mark.integration
def test_crash_after_store_before_done_resends_same_uids(db: Database, tmp_path: Path) -> None:
    port = free_port()
    cfg = _cfg(tmp_path, {"pacs": port}, lease_s=1.0)
    dx = dx_image()
    (sr,) = [o for o in encode_all(classification(dx), [dx], cfg) if o.Modality == "SR"]
    store_results(
        db, cfg.node.outbox_dir, [sr], model="m", infer_job_id=None, destinations=["pacs"]
    )
    code = (
        "import sys; from tests.node.deliver.test_sender import crashing_sender_main; "
        "crashing_sender_main(*sys.argv[1:])"
    )
    with storescp(port, tmp_path / "pacs") as out:
        proc = subprocess.run(
            [sys.executable, "-c", code, cfg.model_dump_json(), db.url], cwd=REPO, timeout=60
        )
        assert proc.returncode == 70
        (job,) = _jobs(db, "pacs")
        assert job.status == JobStatus.RUNNING  # stored at the peer, never marked done
        assert _uids(received(out)) == [sr.SOPInstanceUID]
        time.sleep(1.2)  # the lease expires; the reaper returns the job
        assert jobs.reap_expired(db) == 1
        sender = Sender(cfg, db)
        while sender.send_batch(cfg.destinations[0]):
            pass
        (job,) = _jobs(db, "pacs")
        assert job.status == JobStatus.DONE
        assert _uids(received(out)) == [sr.SOPInstanceUID, sr.SOPInstanceUID]


@pytest.mark.integration
@pytest.mark.slow
def test_orthanc_accepts_sr_sc_and_seg_in_the_source_study(db: Database, tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    dicom_port, http_port = free_port(), free_port()
    series = ct_series(n=6, size=64)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    for i, ds in enumerate(series):
        ds.save_as(src_dir / f"{i}.dcm", enforce_file_format=True)
    cfg = _cfg(tmp_path, {"orthanc": dicom_port})
    with orthanc(tmp_path / "orthanc", dicom_port, http_port) as base:
        subprocess.run(
            [
                storescu,
                "-aec",
                "ORTHANC",
                "127.0.0.1",
                str(dicom_port),
                *map(str, src_dir.iterdir()),
            ],
            check=True,
            timeout=60,
        )
        objects = encode_all(segmentation(series), series, cfg)
        store_results(
            db, cfg.node.outbox_dir, objects, model="m", infer_job_id=None, destinations=["orthanc"]
        )
        sender = Sender(cfg, db)
        while sender.send_batch(cfg.destinations[0]):
            pass
        assert {j.status for j in _jobs(db, "orthanc")} == {JobStatus.DONE}
        found = requests.post(
            f"{base}/tools/lookup", data=str(series[0].StudyInstanceUID), timeout=10
        ).json()
        (study_id,) = [f["ID"] for f in found if f["Type"] == "Study"]
        listed = requests.get(f"{base}/studies/{study_id}/series", timeout=10).json()
        modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in listed)
        assert modalities == ["CT", "OT", "PR", "SEG", "SR"]
        instances = requests.get(f"{base}/studies/{study_id}/instances", timeout=10).json()
        got = {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}
        assert {str(o.SOPInstanceUID) for o in objects} <= got
        assert len(got) == len(series) + len(objects)


@pytest.mark.integration
def test_compressed_object_is_decompressed_for_a_destination_without_jpeg(
    db: Database, tmp_path: Path
) -> None:
    port = free_port()
    cfg = _cfg(tmp_path, {"pacs": port})
    src = pydicom.dcmread(str(get_testdata_file("MR_small_jp2klossless.dcm")))
    assert src.file_meta.TransferSyntaxUID.is_compressed
    store_results(
        db, cfg.node.outbox_dir, [src], model="m", infer_job_id=None, destinations=["pacs"]
    )
    with storescp(port, tmp_path / "plain", accept_all=False) as out:
        while Sender(cfg, db).send_batch(cfg.destinations[0]):
            pass
        (got,) = [pydicom.dcmread(f) for f in received(out)]
    assert {j.status for j in _jobs(db, "pacs")} == {JobStatus.DONE}
    assert got.SOPInstanceUID == src.SOPInstanceUID
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert (got.pixel_array == src.pixel_array).all()


@pytest.mark.integration
def test_airnode_send_delivers_and_stops_on_sigterm(db: Database, tmp_path: Path) -> None:
    port = free_port()
    cfg = _cfg(tmp_path, {"pacs": port})
    uids = _results(db, cfg, ["pacs"])
    toml = tmp_path / "airnode.toml"
    toml.write_text(
        f'[node]\ndata_dir = "{cfg.node.data_dir}"\ndatabase_url = "{db.url}"\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {port}\n"
    )
    with storescp(port, tmp_path / "pacs") as out:
        proc = subprocess.Popen([sys.executable, "-m", "node.ops.cli", "send", "-c", str(toml)])
        try:
            _wait(lambda: len(received(out)) == len(uids))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert _uids(received(out)) == uids
    assert {j.status for j in _jobs(db, "pacs")} == {JobStatus.DONE}


def test_without_destinations_results_stay_in_the_outbox_and_stop_is_clean(
    db: Database, tmp_path: Path
) -> None:
    cfg = _cfg(tmp_path, {})
    uids = _results(db, cfg, [])
    sender = Sender(cfg, db, poll_s=0.1)
    with _running(sender):
        time.sleep(1.0)  # at least one housekeeping pass (outbox clean-up) ran
    with db.read() as s:
        assert s.scalars(select(Job).where(Job.kind == JobKind.SEND)).all() == []
    kept = sorted(p for p in cfg.node.outbox_dir.rglob("*.dcm"))
    assert _uids(kept) == uids


@pytest.mark.integration
def test_tls_destination_receives_and_an_untrusted_pacs_certificate_is_refused(
    db: Database, tmp_path: Path
) -> None:
    """DICOM TLS (PS3.15 Annex B): mutual authentication against dcmtk storescp +tls."""
    from node.config import TlsConfig
    from tests.peers import make_ca, make_leaf

    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key, ca_crt = make_ca(pki, "ca")
    srv_key, srv_crt = make_leaf(pki, "pacs", ca_key, ca_crt)
    cli_key, cli_crt = make_leaf(pki, "airnode", ca_key, ca_crt)
    rogue_key, rogue_crt = make_ca(pki, "rogue")
    fake_key, fake_crt = make_leaf(pki, "fake-pacs", rogue_key, rogue_crt)

    good, bad = free_port(), free_port()
    tls = TlsConfig(cert=cli_crt, key=cli_key, ca=ca_crt)
    base = _cfg(tmp_path, {"good": good, "bad": bad})
    cfg = base.model_copy(
        update={"destinations": [d.model_copy(update={"tls": tls}) for d in base.destinations]}
    )
    uids = _results(db, cfg, ["good", "bad"])
    sender = Sender(cfg, db)
    server_flags = ("+tls", str(srv_key), str(srv_crt), "+cf", str(ca_crt), "-rc")
    rogue_flags = ("+tls", str(fake_key), str(fake_crt), "+cf", str(ca_crt), "-rc")
    with (
        storescp(good, tmp_path / "good", *server_flags, aet="GOOD") as d_good,
        storescp(bad, tmp_path / "bad", *rogue_flags, aet="BAD") as d_bad,
    ):
        while sender.send_batch(cfg.destination("good")):
            pass
        sender.send_batch(cfg.destination("bad"))
        assert _uids(received(d_good)) == uids
        assert received(d_bad) == []
    assert {j.status for j in _jobs(db, "good")} == {JobStatus.DONE}
    refused = _jobs(db, "bad")
    assert refused and all(j.status != JobStatus.DONE for j in refused)
    assert all(j.last_error for j in refused)


@pytest.mark.integration
def test_a_resend_after_a_crash_leaves_one_object_per_uid_in_orthanc(
    db: Database, tmp_path: Path
) -> None:
    """At-least-once delivery with deterministic UIDs: the PACS keeps one copy."""
    dicom_port, http_port = free_port(), free_port()
    cfg = _cfg(tmp_path, {"orthanc": dicom_port}, lease_s=1.0)
    dx = dx_image()
    objects = encode_all(classification(dx), [dx], cfg)
    store_results(
        db, cfg.node.outbox_dir, objects, model="m", infer_job_id=None, destinations=["orthanc"]
    )
    code = (
        "import sys; from tests.node.deliver.test_sender import crashing_sender_main; "
        "crashing_sender_main(*sys.argv[1:])"
    )
    with orthanc(tmp_path / "orthanc", dicom_port, http_port) as base:
        proc = subprocess.run(
            [sys.executable, "-c", code, cfg.model_dump_json(), db.url], cwd=REPO, timeout=60
        )
        assert proc.returncode == 70  # killed after the PACS stored, before "done"
        time.sleep(1.2)  # the lease expires; the reaper returns the job
        assert jobs.reap_expired(db) == len(objects)
        sender = Sender(cfg, db)
        while sender.send_batch(cfg.destinations[0]):
            pass
        assert {j.status for j in _jobs(db, "orthanc")} == {JobStatus.DONE}
        instances = requests.get(f"{base}/instances?expand", timeout=10).json()
        uids = [i["MainDicomTags"]["SOPInstanceUID"] for i in instances]
        assert sorted(uids) == sorted(str(o.SOPInstanceUID) for o in objects)
        assert len(uids) == len(set(uids))  # one object per UID, however often sent
        stats = requests.get(f"{base}/statistics", timeout=10).json()
        assert stats["CountInstances"] == len(objects)
