"""STOW-RS destinations: Orthanc's DICOMweb plugin, and a scripted server for the
HTTP outcomes Orthanc cannot be made to give (5xx, 4xx, the Authorization header)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from node.config import ConfigError, NodeConfig, parse_config
from node.deliver import Sender
from node.results import encode_all, store_results
from node.store.db import AuditEvent, Database, Job, JobKind, JobStatus
from tests.conftest import free_port
from tests.node.results.sources import classification, dx_image
from tests.peers import orthanc


def _cfg(tmp: Path, url: str, **dest: Any) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "node": {"data_dir": str(tmp / "data")},
            "send": {"base_delay_s": 0.1, "max_delay_s": 0.2, "max_attempts": 5},
            "destinations": [
                {"name": "web", "kind": "dicomweb", "url": url, "timeout_s": 5.0, **dest}
            ],
        }
    )


def _queue(db: Database, cfg: NodeConfig) -> list[str]:
    dx = dx_image()
    objects = encode_all(classification(dx), [dx], cfg)
    store_results(
        db, cfg.node.outbox_dir, objects, model="m", infer_job_id=None, destinations=["web"]
    )
    return sorted(str(o.SOPInstanceUID) for o in objects)


def _jobs(db: Database) -> list[Job]:
    with db.read() as s:
        return list(s.scalars(select(Job).where(Job.kind == JobKind.SEND)))


def _drain(sender: Sender, cfg: NodeConfig) -> None:
    while sender.send_batch(cfg.destinations[0]):
        pass


@pytest.mark.integration
def test_results_reach_orthanc_by_stow_rs(db: Database, tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc", free_port(), free_port(), dicomweb=True) as base:
        cfg = _cfg(tmp_path, f"{base}/dicom-web")
        uids = _queue(db, cfg)
        _drain(Sender(cfg, db), cfg)
        assert {j.status for j in _jobs(db)} == {JobStatus.DONE}
        listed = requests.get(f"{base}/instances?expand", timeout=10).json()
        assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in listed) == uids
        # Sent again (a resend after a crash): Orthanc keeps one copy per UID.
        with db.session() as s:
            for job in s.scalars(select(Job).where(Job.kind == JobKind.SEND)):
                job.status = JobStatus.QUEUED
        _drain(Sender(cfg, db), cfg)
        assert requests.get(f"{base}/statistics", timeout=10).json()["CountInstances"] == len(uids)
    with db.read() as s:
        sent = list(s.scalars(select(AuditEvent).where(AuditEvent.event == "sent")))
    assert len(sent) == 2 * len(uids)
    assert all(
        e.peer == f"{base}/dicom-web" and "STOW-RS HTTP 200" in (e.detail or "") for e in sent
    )


class _Scripted(BaseHTTPRequestHandler):
    """Answers every POST with the server's next scripted status; records headers."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        self.server.seen.append((self.path, dict(self.headers), body))
        status, payload = self.server.script.pop(0)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    def __init__(self, script: list[tuple[int, Any]]) -> None:
        self.script = script
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        super().__init__(("127.0.0.1", 0), _Scripted)


@pytest.fixture
def scripted() -> Iterator[_Server]:
    server = _Server([])
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_5xx_retries_4xx_is_dead_and_the_auth_header_comes_from_the_environment(
    db: Database, tmp_path: Path, scripted: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_TOKEN", "Bearer s3cret")
    url = f"http://127.0.0.1:{scripted.server_address[1]}/wado"
    cfg = _cfg(tmp_path, url, auth_header_env="PACS_TOKEN")
    uids = _queue(db, cfg)
    sender = Sender(cfg, db)
    scripted.script += [(503, {})]
    sender.send_batch(cfg.destinations[0])
    assert {(j.status, j.attempts) for j in _jobs(db)} == {(JobStatus.FAILED, 1)}
    path, headers, body = scripted.seen[0]
    assert path == "/wado/studies"
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert body.count(b"Content-Type: application/dicom\r\n") == len(uids)
    # One instance refused for lack of resources (retry), one as not understood (dead),
    # the rest stored: HTTP 202 with per-instance reasons.
    fail = [
        {"00081155": {"vr": "UI", "Value": [uids[0]]}, "00081197": {"vr": "US", "Value": [0xA700]}},
        {"00081155": {"vr": "UI", "Value": [uids[1]]}, "00081197": {"vr": "US", "Value": [0xC000]}},
    ]
    ok = [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids[2:]]
    scripted.script += [
        (202, {"00081198": {"vr": "SQ", "Value": fail}, "00081199": {"vr": "SQ", "Value": ok}})
    ]
    with db.session() as s:  # due now
        for job in s.scalars(select(Job)):
            job.not_before = 0.0
    sender.send_batch(cfg.destinations[0])
    by_uid = {j.result_sop_instance_uid: j for j in _jobs(db)}
    assert by_uid[uids[0]].status == JobStatus.FAILED
    assert by_uid[uids[1]].status == JobStatus.DEAD
    assert "0xC000" in (by_uid[uids[1]].last_error or "")
    assert all(by_uid[u].status == JobStatus.DONE for u in uids[2:])
    # A 4xx for the whole request: permanent.
    scripted.script += [(401, {})]
    with db.session() as s:
        for job in s.scalars(select(Job)):
            job.not_before = 0.0
    sender.send_batch(cfg.destinations[0])
    assert by_uid[uids[0]].id in {j.id for j in _jobs(db) if j.status == JobStatus.DEAD}
    assert "HTTP 401" in (next(j for j in _jobs(db) if j.id == by_uid[uids[0]].id).last_error or "")
    assert "s3cret" not in str([j.last_error for j in _jobs(db)])


def test_unreachable_is_transient_and_a_missing_secret_is_permanent(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, f"http://127.0.0.1:{free_port()}/dicom-web")
    _queue(db, cfg)
    Sender(cfg, db).send_batch(cfg.destinations[0])
    jobs = _jobs(db)
    assert {j.status for j in jobs} == {JobStatus.FAILED}
    assert all("no answer" in (j.last_error or "") for j in jobs)
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    cfg2 = _cfg(tmp_path, f"http://127.0.0.1:{free_port()}/x", auth_header_env="NO_SUCH_TOKEN")
    with db.session() as s:
        for job in s.scalars(select(Job)):
            job.not_before = 0.0
    Sender(cfg2, db).send_batch(cfg2.destinations[0])
    assert {j.status for j in _jobs(db)} == {JobStatus.DEAD}
    assert all("NO_SUCH_TOKEN" in (j.last_error or "") for j in _jobs(db))


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ({"kind": "dicomweb"}, "needs url"),
        ({"kind": "dicomweb", "url": "ftp://x"}, "needs url"),
        ({"kind": "dicomweb", "url": "http://x", "host": "h"}, "host and port"),
        ({"ae_title": "PACS", "host": "h"}, "needs port"),
        ({"ae_title": "P", "host": "h", "port": 104, "url": "http://x"}, 'need kind = "dicomweb"'),
        ({"kind": "dicomweb", "url": "http://x", "auth_header_env": "A B"}, "auth_header_env"),
    ],
)
def test_destination_config_is_checked(dest: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"destinations": [{"name": "d", **dest}]})


@pytest.mark.integration
def test_https_with_a_client_certificate_and_an_untrusted_server_is_refused(
    db: Database, tmp_path: Path
) -> None:
    """The server requires our client certificate; a server whose certificate our CA
    did not sign gets nothing (the jobs wait for a retry with the TLS error)."""
    import ssl

    from tests.peers import make_ca, make_leaf

    pki = tmp_path / "pki"
    pki.mkdir()
    ca_key, ca_crt = make_ca(pki, "ca")
    srv_key, srv_crt = make_leaf(pki, "vna", ca_key, ca_crt)
    cli_key, cli_crt = make_leaf(pki, "airnode", ca_key, ca_crt)
    rogue_key, rogue_crt = make_ca(pki, "rogue")
    fake_key, fake_crt = make_leaf(pki, "fake", rogue_key, rogue_crt)
    servers: list[_Server] = []
    for key, crt in ((srv_key, srv_crt), (fake_key, fake_crt)):
        server = _Server([])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(crt), str(key))
        ctx.load_verify_locations(str(ca_crt))
        ctx.verify_mode = ssl.CERT_REQUIRED
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    good, rogue = servers
    tls = {"cert": str(cli_crt), "key": str(cli_key), "ca": str(ca_crt)}
    try:
        cfg = _cfg(tmp_path, f"https://127.0.0.1:{good.server_address[1]}/dw", tls=tls)
        uids = _queue(db, cfg)
        ok = [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]
        good.script.append((200, {"00081199": {"vr": "SQ", "Value": ok}}))
        Sender(cfg, db).send_batch(cfg.destinations[0])
        assert {j.status for j in _jobs(db)} == {JobStatus.DONE}
        assert len(good.seen) == 1

        with db.session() as s:
            for job in s.scalars(select(Job)):
                job.status, job.not_before = JobStatus.QUEUED, 0.0
        cfg = _cfg(tmp_path, f"https://127.0.0.1:{rogue.server_address[1]}/dw", tls=tls)
        Sender(cfg, db).send_batch(cfg.destinations[0])
        jobs = _jobs(db)
        assert {j.status for j in jobs} == {JobStatus.FAILED}
        assert all("TLS" in (j.last_error or "") for j in jobs)
        assert rogue.seen == []
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
