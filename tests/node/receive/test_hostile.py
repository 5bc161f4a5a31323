"""The receiver under attack from raw sockets: every attack runs while a legitimate
C-ECHO must still be answered within 1 s, and bounded memory and disk are checked.

Attackers connect from 127.0.0.2 (still loopback) so that the per-host limit
separates them from the legitimate peer on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.node.receive import test_server
from tests.node.receive.test_server import Node

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.2"

make_node = test_server.make_node  # the receiver-process fixture


def _echo_s(port: int) -> float:
    """Seconds a full C-ECHO (associate, echo, release) takes; fails if refused."""
    t = time.monotonic()
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="AIRNODE")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0
    return time.monotonic() - t


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _associate_rq(abstract: str, calling: str = "EVIL", called: str = "AIRNODE") -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 §9.3.2) with one presentation context."""
    ts = _item(0x40, b"1.2.840.10008.1.2")
    pc = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract.encode()) + ts)
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + pc
        + user
    )
    return struct.pack(">BBI", 1, 0, len(body)) + body


def _attacker() -> socket.socket:
    s = socket.socket()
    s.bind((ATTACKER, 0))
    return s


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextmanager
def _running(target: object) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop,), daemon=True)  # type: ignore[arg-type]
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(30)


def test_a_60000_character_uid_does_not_stall_the_receiver(make_node) -> None:  # type: ignore[no-untyped-def]
    node: Node = make_node(extra='log_level = "DEBUG"')
    rq = _associate_rq("1." * 29_999 + "1")

    def attack(stop: threading.Event) -> None:
        while not stop.is_set():
            with _attacker() as s:
                s.settimeout(10)
                try:
                    s.connect(("127.0.0.1", node.port))
                    s.sendall(rq)
                    s.recv(1024)
                except OSError:
                    pass

    with _running(attack):
        time.sleep(0.5)
        for _ in range(3):
            assert _echo_s(node.port) < 1.0
    log = node.log.read_text(errors="replace")
    assert "1.1.1.1.1.1.1.1.1.1.1" not in log  # masked, not logged in full


def test_a_pdu_claiming_4_gib_is_refused_before_it_is_buffered(make_node) -> None:  # type: ignore[no-untyped-def]
    node: Node = make_node()
    _echo_s(node.port)
    before = _rss_kib(node.proc.pid)
    sent = [0]

    def attack(stop: threading.Event) -> None:
        block = bytes(1 << 20)
        while not stop.is_set() and sent[0] < 256 << 20:
            with _attacker() as s:
                s.settimeout(5)
                try:
                    s.connect(("127.0.0.1", node.port))
                    s.sendall(struct.pack(">BBI", 1, 0, 0xFFFFFFFF))
                    while not stop.is_set() and sent[0] < 256 << 20:
                        s.sendall(block)
                        sent[0] += len(block)
                except OSError:
                    pass

    with _running(attack):
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and sent[0] < 128 << 20:
            assert _echo_s(node.port) < 1.0
            time.sleep(0.2)
        grown_mib = (_rss_kib(node.proc.pid) - before) / 1024
    # Before the bound, pynetdicom buffered what followed the header (hundreds of MiB).
    assert grown_mib < 32, grown_mib


def test_trickling_connections_are_counted_and_cut(make_node) -> None:  # type: ignore[no-untyped-def]
    node: Node = make_node(
        extra="[security]\nmax_associations = 8\nmax_associations_per_host = 4\n"
        "acse_timeout_s = 2\nnetwork_timeout_s = 30"
    )
    rq = _associate_rq(CTImageStorage)
    socks = []
    for _ in range(20):
        s = _attacker()
        s.connect(("127.0.0.1", node.port))
        socks.append(s)
    t0 = time.monotonic()
    try:
        for i in range(4):  # one byte a second, never a whole A-ASSOCIATE-RQ
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(rq[i : i + 1])
            assert _echo_s(node.port) < 1.0
            time.sleep(max(0.0, t0 + i + 1 - time.monotonic()))
        # All 20 are closed by now: 16 at once (over the per-host limit), 4 after the
        # negotiation deadline, although each sent a byte within every second.
        for s in socks:
            s.settimeout(5)
            try:
                assert s.recv(65536) in (b"", bytes([3, 0, 0, 0, 0, 4, 0, 2, 3, 2]))
                assert s.recv(65536) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in socks:
            s.close()
    assert _echo_s(node.port) < 1.0


def _command(sop_class: str, sop_instance: str) -> bytes:
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = 0x0001  # C-STORE-RQ
    ds.MessageID = 1
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = sop_instance
    body = encode(ds, True, True)
    assert body is not None
    return b"\x00\x00\x00\x00\x04\x00\x00\x00" + struct.pack("<I", len(body)) + body


def _p_data(context_id: int, header: int, data: bytes) -> bytes:
    pdv = struct.pack(">I", 2 + len(data)) + bytes([context_id, header]) + data
    return struct.pack(">BBI", 4, 0, len(pdv)) + pdv


def _tmp_bytes(node: Node) -> int:
    tmp = node.spool / "tmp"
    return sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else 0


@pytest.mark.parametrize(
    "limit", ["max_instance_bytes = 1048576", "min_free_bytes = 1125899906842624"]
)
def test_an_endless_data_set_is_cut_on_the_fly_and_its_temp_file_removed(
    make_node: Callable[..., Node], limit: str
) -> None:
    node: Node = make_node(extra=f"[security]\n{limit}\nmax_pdu_bytes = 65536")
    ae = AE(ae_title="STREAMER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AIRNODE")
    assert assoc.is_established
    cx = assoc.accepted_contexts[0].context_id
    assert cx is not None
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    raw = assoc.dul.socket.socket
    raw.sendall(_p_data(cx, 0x03, _command(CTImageStorage, "1.2.3.4.5.6.7")))
    chunk = _p_data(cx, 0x00, bytes(60_000))  # data set fragments, never the last one
    peak = 0
    for i in range(8 * 1024 * 1024 // 60_000):
        raw.sendall(chunk)
        if i % 10 == 0:
            peak = max(peak, _tmp_bytes(node))
            assert _echo_s(node.port) < 1.0 if i % 50 == 0 else True
    peak = max(peak, _tmp_bytes(node))
    # 8 MiB streamed; at most 1 MiB (and one PDU) ever held on disk (none below the
    # free-space reserve).
    assert peak <= 1024 * 1024 + 65536, peak
    assoc.abort()
    deadline = time.monotonic() + 10
    while _tmp_bytes(node) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _tmp_bytes(node) == 0
    assert list((node.spool / "tmp").rglob("*.dcm")) == []


def test_a_dropped_transfer_leaves_no_temp_file(make_node) -> None:  # type: ignore[no-untyped-def]
    node: Node = make_node(extra="[security]\nmax_pdu_bytes = 65536")
    ae = AE(ae_title="STREAMER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AIRNODE")
    cx = assoc.accepted_contexts[0].context_id
    assert cx is not None
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    raw = assoc.dul.socket.socket
    raw.sendall(_p_data(cx, 0x03, _command(CTImageStorage, "1.2.3.4.5.6.8")))
    raw.sendall(_p_data(cx, 0x00, bytes(50_000)))
    deadline = time.monotonic() + 10
    while not _tmp_bytes(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tmp_bytes(node) > 0
    raw.shutdown(socket.SHUT_RDWR)  # the sender vanishes mid-instance
    assoc.abort()
    deadline = time.monotonic() + 10
    while list((node.spool / "tmp").rglob("*.dcm")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list((node.spool / "tmp").rglob("*.dcm")) == []
    assert _echo_s(node.port) < 1.0


def test_an_instance_over_the_limit_gets_c001(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from node.ops.synthetic import ct_series

    node: Node = make_node(extra="[security]\nmax_instance_bytes = 100000\nmax_pdu_bytes = 16384")
    ds = ct_series(1, 512, 512, seed=3)[0]
    ae = AE(ae_title="BIGSCU")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AIRNODE")
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC001
    assert not list((node.spool / "tmp").rglob("*.dcm"))
