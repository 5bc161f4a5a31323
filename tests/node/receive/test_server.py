"""The receiver against real peers: dcmtk's storescu/echoscu, raw sockets, TLS, kill -9.

Every test starts ``airnode receive`` as its own process (so ``kill -9`` is real) and
stops it in ``finally``.  What is checked is what a PACS administrator would check:
the status each instance got, the file on disk and its SHA-256, the row, the logs.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from node.config import load_config
from node.ops.synthetic import ct_series, write_series
from node.store.db import init_db
from tests.conftest import free_port, require_tool
from tests.peers import make_ca, make_leaf

pytestmark = pytest.mark.integration

ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path
    cfg: Path

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool"

    def rows(self) -> dict[str, tuple[str, str, str]]:
        """SOP Instance UID → (path, sha256, transfer syntax)."""
        con = sqlite3.connect(self.data_dir / "airnode.sqlite")
        try:
            return {
                u: (p, h, t)
                for u, p, h, t in con.execute(
                    "SELECT sop_instance_uid, path, sha256, transfer_syntax_uid FROM instances"
                )
            }
        finally:
            con.close()


#: The ``make_node`` fixture: starts ``airnode receive`` (``extra`` TOML, ``tls``, ``name``).
MakeNode = Callable[..., Node]


def _write_cfg(path: Path, port: int, data_dir: Path, extra: str = "") -> None:
    level = "" if "log_level" in extra else 'log_level = "INFO"'
    path.write_text(
        f"""
[node]
ae_title = "AIRNODE"
port = {port}
data_dir = "{data_dir}"
{level}
{extra}
""",
        encoding="utf-8",
    )


def _start(cfg: Path, port: int, data_dir: Path, log: Path, tls: bool = False) -> Node:
    init_db(load_config(cfg).node.resolved_database_url).dispose()  # as `airnode db upgrade`
    logf = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.ops.cli", "receive", "--config", str(cfg)],
        stdout=logf,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[3],
    )
    node = Node(proc, port, data_dir, log, cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
            if tls or _answers(port):
                return node
        except OSError:
            pass
        time.sleep(0.2)
    _stop(node)
    raise RuntimeError("receiver did not start")


def _answers(port: int) -> bool:
    """The listener negotiates (accepts or rejects an association)."""
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="AIRNODE")
    if assoc.is_established:
        assoc.release()
        return True
    return bool(assoc.is_rejected)


def _stop(node: Node) -> None:
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(20)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(10)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[MakeNode]:
    started: list[Node] = []

    def make(extra: str = "", tls: bool = False, name: str = "node") -> Node:
        port = free_port()
        data_dir = tmp_path / name
        cfg = tmp_path / f"{name}.toml"
        _write_cfg(cfg, port, data_dir, extra)
        node = _start(cfg, port, data_dir, tmp_path / f"{name}.log", tls=tls)
        started.append(node)
        return node

    try:
        yield make
    finally:
        for node in started:
            _stop(node)


def _storescu(port: int, files: list[Path], *extra: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("storescu")
    return subprocess.run(
        [tool, "-v", "-nh", *extra, "-aec", "AIRNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=240,
    )


def _acknowledged(output: str) -> tuple[set[str], set[str]]:
    """Files storescu reported as stored with success, and those that got anything else."""
    ok: set[str] = set()
    bad: set[str] = set()
    current: str | None = None
    for line in output.splitlines():
        m = re.match(r"I: Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
            continue
        if current and "Received Store Response" in line:
            (ok if "(Success)" in line else bad).add(current)
            current = None
        elif current and line.startswith("E: Store Failed"):
            bad.add(current)
            current = None
    return ok, bad


def _echoscu(port: int, *extra: str) -> int:
    tool = require_tool("echoscu")
    return subprocess.run(
        [tool, *extra, "-aec", "AIRNODE", "127.0.0.1", str(port)],
        capture_output=True,
        env=ENV,
        timeout=60,
    ).returncode


def _check_stored(node: Node, sent: dict[str, Path]) -> None:
    """Every acknowledged instance is on disk with the row's hash and the sent pixels."""
    rows = node.rows()
    for uid, src in sent.items():
        assert uid in rows, src.name
        rel, digest, ts = rows[uid]
        stored = (node.spool / rel).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == digest, src.name
        got = pydicom.dcmread(node.spool / rel)
        want = pydicom.dcmread(src)
        assert got.SOPInstanceUID == uid
        assert str(got.file_meta.TransferSyntaxUID) == ts
        if str(want.file_meta.TransferSyntaxUID) == ts:
            assert got.PixelData == want.PixelData, src.name


# ---------------------------------------------------------------------- real files
# storescu proposes a compressed syntax only when told to; one run per group.
_GROUPS: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.4.50": ("-xy",),
    "1.2.840.10008.1.2.4.51": ("-xx",),
    "1.2.840.10008.1.2.4.70": ("-xs",),
    "1.2.840.10008.1.2.4.80": ("-xt",),
    "1.2.840.10008.1.2.4.81": ("-xu",),
    "1.2.840.10008.1.2.4.90": ("-xv",),
    "1.2.840.10008.1.2.4.91": ("-xw",),
    "1.2.840.10008.1.2.5": ("-xr",),
}
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _bundled_files(dest: Path) -> dict[str, list[Path]]:
    """pydicom's bundled files that dcmtk can read, each with a fresh SOP Instance UID
    and study/series UIDs (several variants share one UID; some have no Study UID,
    which the receiver refuses with 0xA900), grouped by transfer syntax."""
    dcmodify = require_tool("dcmodify")
    dcmdump = require_tool("dcmdump")
    dest.mkdir()
    groups: dict[str, list[Path]] = {}
    for src in sorted(get_testdata_files("*.dcm")):
        try:
            ds = pydicom.dcmread(src)
            ts = str(ds.file_meta.TransferSyntaxUID)
            meta_ok = "MediaStorageSOPClassUID" in ds.file_meta
        except Exception:
            continue
        if ts not in (*_GROUPS, *_UNCOMPRESSED) or "PixelData" not in ds or not meta_ok:
            continue
        if "SOPInstanceUID" not in ds:
            continue
        target = dest / Path(src).name
        target.write_bytes(Path(src).read_bytes())
        ok = subprocess.run([dcmdump, "-q", str(target)], capture_output=True, timeout=60)
        if ok.returncode != 0:
            target.unlink()
            continue
        subprocess.run(
            [dcmodify, "-q", "-nb", "-gin", "-gst", "-gse", str(target)], check=True, timeout=60
        )
        groups.setdefault(ts, []).append(target)
    return groups


@pytest.mark.slow
def test_bundled_files_in_every_transfer_syntax_are_stored_intact(
    make_node: MakeNode, tmp_path: Path
) -> None:
    groups = _bundled_files(tmp_path / "files")
    assert set(_GROUPS) <= set(groups), f"missing test files for {set(_GROUPS) - set(groups)}"
    node = make_node()
    sent: dict[str, Path] = {}
    for ts, files in groups.items():
        out = _storescu(node.port, files, "-R", *_GROUPS.get(ts, ()))
        ok, bad = _acknowledged(out.stdout + out.stderr)
        assert bad == set(), (ts, bad, out.stderr[-2000:])
        # storescu skips files it finds unsendable itself (e.g. rtdose_rle.dcm)
        assert ok, ts
        for f in map(Path, ok):
            sent[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = f
    _check_stored(node, sent)
    rows = node.rows()
    for ts in _GROUPS:  # compressed data arrived in its own syntax, not transcoded
        assert any(r[2] == ts for r in rows.values()), ts
    assert [p for p in (node.spool / "tmp").rglob("*") if p.is_file()] == []


def test_explicit_big_endian_is_accepted(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    src = next(p for p in get_testdata_files("MR_small_bigendian.dcm"))
    ds = pydicom.dcmread(src)
    ae = AE(ae_title="BIGENDIAN")
    ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.2")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AIRNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    assert node.rows()[ds.SOPInstanceUID][2] == "1.2.840.10008.1.2.2"


def _split(paths: list[Path], n: int) -> list[list[Path]]:
    return [paths[i::n] for i in range(n)]


@pytest.mark.slow
def test_ct_series_over_four_concurrent_associations(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = make_node(extra="receiver_processes = 2")
    paths = write_series(ct_series(300, 128, 128, seed=5), tmp_path / "ct")
    tool = require_tool("storescu")
    procs = [
        subprocess.Popen(
            [tool, "-v", "-aec", "AIRNODE", "127.0.0.1", str(node.port), *map(str, part)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
        )
        for part in _split(paths, 4)
    ]
    acked: set[str] = set()
    for p in procs:
        out, _ = p.communicate(timeout=240)
        ok, bad = _acknowledged(out)
        assert bad == set()
        acked |= ok
    assert acked == {str(p) for p in paths}
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    _check_stored(node, sent)
    con = sqlite3.connect(node.data_dir / "airnode.sqlite")
    try:
        assert con.execute("SELECT instance_count, state FROM studies").fetchall() == [
            (300, "receiving")
        ]
    finally:
        con.close()


# --------------------------------------------------------------------- kill -9
@pytest.mark.slow
def test_kill_9_mid_stream_loses_nothing_acknowledged(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = make_node()
    paths = write_series(ct_series(300, 128, 128, seed=9), tmp_path / "ct")
    tool = require_tool("storescu")
    proc = subprocess.Popen(
        [tool, "-v", "-aec", "AIRNODE", "127.0.0.1", str(node.port), *map(str, paths)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(node.rows()) < 40:
        time.sleep(0.05)
    node.proc.kill()  # SIGKILL: no clean-up of any kind
    node.proc.wait(10)
    out, _ = proc.communicate(timeout=120)
    acked, _ = _acknowledged(out)
    assert 0 < len(acked) < len(paths), "the stream should have been cut in the middle"
    restarted = _start(node.cfg, node.port, node.data_dir, node.log)
    try:
        rows = node.rows()
        by_path = {str(p): str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
        for f in acked:  # nothing acknowledged is missing
            assert by_path[f] in rows
        assert [p for p in (node.spool / "tmp").rglob("*") if p.is_file()] == []
        out2 = _storescu(node.port, paths)
        ok, bad = _acknowledged(out2.stdout + out2.stderr)
        assert bad == set() and len(ok) == len(paths)
        rows = node.rows()
        assert len(rows) == len(paths) == len(set(by_path.values()))
        files = [p for p in node.spool.rglob("*") if p.is_file() and p.parent.name != "tmp"]
        assert len([f for f in files if f.suffix == ".dcm"]) == len(paths)  # no orphan
        assert [f for f in files if f.suffix not in (".dcm", ".lock")] == []  # no partial
        _check_stored(node, {v: Path(k) for k, v in by_path.items()})
    finally:
        _stop(restarted)


# ------------------------------------------------------------------- bad input
def _crafted(path: Path, sop_class: str, sop_inst: str, body: bytes) -> Path:
    """A Part 10 file whose meta says (sop_class, sop_inst) followed by raw ``body``."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_inst)
    meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    meta.ImplementationClassUID = UID("1.2.3.4")
    with path.open("wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), meta, enforce_standard=True)
        f.write(body)
    return path


def _raw_dataset(ds: pydicom.Dataset) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    fp = io.BytesIO(data)
    fp.seek(132)
    pydicom.filereader._read_file_meta_info(fp)
    return data[fp.tell() :]


def _send_file(port: int, path: Path, calling: str = "BADSCU") -> tuple[int, str]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, unparsed
    assoc = ae.associate("127.0.0.1", port, ae_title="AIRNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return int(status.Status), str(status.get("ErrorComment", ""))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_data_sets_get_the_status_of_the_design_table(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = make_node(extra="[security]\nmax_instance_bytes = 100000\nmin_free_bytes = 0")
    good = ct_series(2, 32, 32, seed=3)
    body = _raw_dataset(good[0])
    uid, cls = good[0].SOPInstanceUID, good[0].SOPClassUID
    cases = {
        "truncated": (_crafted(tmp_path / "t.dcm", cls, uid, body[:-200]), 0xC210),
        "garbage": (_crafted(tmp_path / "g.dcm", cls, uid, os.urandom(4000)), 0xC210),
        "uid differs": (_crafted(tmp_path / "d.dcm", cls, good[1].SOPInstanceUID, body), 0xA900),
    }
    evil = good[1].copy()
    evil.SOPInstanceUID = "../../x"
    cases["path traversal"] = (
        _crafted(tmp_path / "p.dcm", cls, "../../x", _raw_dataset(evil)),
        0xA900,
    )
    big = ct_series(1, 256, 256, seed=4)[0]  # 128 KiB of pixels > 100000 bytes
    cases["too large"] = (
        _crafted(tmp_path / "b.dcm", cls, big.SOPInstanceUID, _raw_dataset(big)),
        0xC001,
    )
    for name, (path, expected) in cases.items():
        status, comment = _send_file(node.port, path)
        assert status == expected, (name, hex(status), comment)
        assert comment, name
        assert _echoscu(node.port) == 0, f"echo after {name}"
    assert node.rows() == {}
    outside = [p for p in node.data_dir.parent.rglob("x") if p.is_file()]
    assert outside == []
    assert [p for p in (node.spool / "tmp").rglob("*") if p.is_file()] == []
    log = node.log.read_text(errors="replace")
    assert "C211" not in log.upper()


def _reject_reason(port: int, calling: str, called: str) -> tuple[int, int, int] | None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return None
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    assert rsp is not None and rsp.result is not None and rsp.result_source is not None
    assert rsp.diagnostic is not None
    return (
        int(rsp.result),
        int(rsp.result_source),
        int(getattr(rsp.diagnostic, "value", rsp.diagnostic)),
    )


def test_association_policy_rejections(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(
        extra='[security]\nallowed_calling_aets = ["ECHOSCU", "GOODSCU"]\n'
        "max_associations = 3\nmax_associations_per_host = 3\nacse_timeout_s = 3"
    )
    assert _reject_reason(node.port, "EVILSCU", "AIRNODE") == (1, 1, 3)
    assert _reject_reason(node.port, "GOODSCU", "NOTUS") == (1, 1, 7)
    assert _echoscu(node.port) == 0
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title="AIRNODE") for _ in range(3)]
    try:
        assert all(a.is_established for a in held)
        assert _reject_reason(node.port, "GOODSCU", "AIRNODE") == (2, 3, 2)
    finally:
        for a in held:
            a.release()
    time.sleep(0.5)
    assert _echoscu(node.port) == 0


def test_allowed_hosts_rejects_other_addresses(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(extra='[security]\nallowed_hosts = ["10.9.9.9"]')
    assert _reject_reason(node.port, "ANYSCU", "AIRNODE") == (1, 1, 1)


def test_random_bytes_and_silent_clients_do_not_disturb_service(make_node) -> None:  # type: ignore[no-untyped-def]
    node = make_node(extra="[security]\nacse_timeout_s = 2\nnetwork_timeout_s = 5")
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as noisy:
        noisy.sendall(os.urandom(3000))
        assert _echoscu(node.port) == 0
        noisy.settimeout(30)
        try:
            while noisy.recv(4096):
                pass  # the receiver answers with an A-ABORT or closes
        except ConnectionResetError:
            pass
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as silent:
        assert _echoscu(node.port) == 0  # served while the silent one is connected
        silent.settimeout(30)
        assert silent.recv(4096) == b""  # closed by the receiver's ARTIM timer
    assert _echoscu(node.port) == 0


# ------------------------------------------------------------------------- TLS
@pytest.mark.slow
def test_tls_trusted_client_succeeds_plaintext_and_untrusted_fail(
    make_node: MakeNode, tmp_path: Path
) -> None:
    d = tmp_path / "pki"
    d.mkdir()
    ca_key, ca_crt = make_ca(d, "ca")
    srv_key, srv_crt = make_leaf(d, "server", ca_key, ca_crt)
    cli_key, cli_crt = make_leaf(d, "client", ca_key, ca_crt)
    rogue_key, rogue_crt = make_ca(d, "rogue")
    bad_key, bad_crt = make_leaf(d, "intruder", rogue_key, rogue_crt)
    node = make_node(
        extra=f'[security]\nacse_timeout_s = 3\n[security.tls]\ncert = "{srv_crt}"\n'
        f'key = "{srv_key}"\nca = "{ca_crt}"\nrequire_client_cert = true',
        tls=True,
    )
    files = write_series(ct_series(2, 32, 32, seed=12), tmp_path / "ct")
    ok = _storescu(node.port, files, "+tls", str(cli_key), str(cli_crt), "+cf", str(ca_crt))
    acked, bad = _acknowledged(ok.stdout + ok.stderr)
    assert bad == set() and acked == {str(f) for f in files}, ok.stderr[-2000:]
    assert len(node.rows()) == 2
    assert _echoscu(node.port) != 0  # plaintext on the TLS port
    untrusted = _storescu(
        node.port, files[:1], "+tls", str(bad_key), str(bad_crt), "+cf", str(ca_crt)
    )
    acked, _ = _acknowledged(untrusted.stdout + untrusted.stderr)
    assert acked == set() and untrusted.returncode != 0
    assert _echoscu(node.port, "+tls", str(cli_key), str(cli_crt), "+cf", str(ca_crt)) == 0


# --------------------------------------------------------------------- no PHI
@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_logs_hold_no_patient_name_id_or_birth_date(make_node, tmp_path: Path, level: str) -> None:  # type: ignore[no-untyped-def]
    node = make_node(extra=f'log_level = "{level}"\n[security]\nmax_instance_bytes = 60000')
    series = ct_series(3, 32, 32, seed=21, non_ascii_name=True)
    files = write_series(series, tmp_path / "ct")
    bundled = [Path(p) for p in get_testdata_files("CT_small.dcm")]
    _storescu(node.port, [*files, *bundled])
    big = ct_series(1, 256, 256, seed=22)[0]  # refused: exercises the warning path
    big_file = write_series([big], tmp_path / "big")[0]
    _storescu(node.port, [big_file])
    _stop(node)
    log = node.log.read_text(encoding="utf-8", errors="replace")
    assert len(node.rows()) == 4
    for ds in [*series, big, pydicom.dcmread(bundled[0])]:
        for value in (str(ds.PatientName), str(ds.PatientID), str(ds.get("PatientBirthDate", ""))):
            if value:
                assert value not in log, (level, value)
        for part in str(ds.PatientName).split("^"):
            if len(part) > 2:
                assert part not in log, (level, part)


def _children(pid: int) -> set[int]:
    """The receiver replicas the supervisor started (not multiprocessing's helpers)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    kids = {int(p) for p in path.read_text().split()} if path.exists() else set()
    out = set()
    for k in kids:
        try:
            if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes():
                out.add(k)
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_a_killed_receiver_process_is_replaced_and_service_continues(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node(extra="receiver_processes = 2")
    before = _children(node.proc.pid)
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = _children(node.proc.pid)
        if len(after) == 2 and victim not in after:
            break
        time.sleep(0.2)
    assert victim not in after and len(after) == 2
    files = write_series(ct_series(8, 32, 32, seed=31), tmp_path / "ct")
    for _ in range(4):  # several connections, so both processes take some
        assert _echoscu(node.port) == 0
    out = _storescu(node.port, files)
    ok, bad = _acknowledged(out.stdout + out.stderr)
    assert bad == set() and len(ok) == 8
    assert len(node.rows()) == 8
