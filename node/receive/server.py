"""The DICOM listener: association policy, TLS, the C-ECHO/C-STORE handlers, processes.

pynetdicom does the DICOM upper layer; this module adds what a hospital network
needs around it:

- an association policy checked before any presentation context is negotiated
  (PS3.8 §7.1.1.9 A-ASSOCIATE-RJ): unknown calling AE → (1, 1, 3), wrong called AE →
  (1, 1, 7), host not allowed → (1, 1, 1), too many associations in total or from
  one host → transient (2, 3, 2);
- DICOM TLS (PS3.15 Annex B, BCP 195: TLS 1.2 or newer) whose handshake runs in the
  connection's own thread with a timeout, so a silent or plaintext client cannot
  stall the accept loop (pynetdicom does it in the accept loop);
- several processes accepting on one port (``SO_REUSEPORT``) so that ingest is not
  bound to one GIL, with the association limits shared through a small array of
  counters in shared memory (one row per process, zeroed when a process is replaced);
- pynetdicom's chunked receive (``STORE_RECV_CHUNKED_DATASET``) with its temp files in
  ``spool/tmp``: a data set goes from the socket to a file on the spool's own file
  system and is hard-linked into place, never held whole in memory.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from node.config import NodeConfig, SecurityConfig, TlsConfig
from node.logs import configure_logging, uid_tag
from node.receive.mpps import MppsScp, mpps_context
from node.receive.spool import Spool, Status, StoreOutcome
from node.store.db import init_db

__all__ = [
    "TRANSFER_SYNTAXES",
    "AssociationGuard",
    "Receiver",
    "run",
    "server_tls_context",
    "storage_contexts",
]

log = logging.getLogger(__name__)

#: Transfer syntaxes offered for storage (PS3.5 §10 and Annex A).  Deflated
#: (1.2.840.10008.1.2.1.99) is deliberately absent: a small deflate bomb can expand
#: to gigabytes before any size check could run.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


def storage_contexts() -> list[PresentationContext]:
    """Every storage SOP class pynetdicom knows, plus Verification, with our syntaxes."""
    contexts: list[PresentationContext] = []
    for template in [*AllStoragePresentationContexts]:
        cx = PresentationContext()
        cx.abstract_syntax = template.abstract_syntax
        cx.transfer_syntax = list(TRANSFER_SYNTAXES)
        contexts.append(cx)
    echo = PresentationContext()
    echo.abstract_syntax = Verification
    echo.transfer_syntax = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
    contexts.append(echo)
    return contexts


def server_tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """A TLS 1.2+ server context (PS3.15 Annex B, BCP 195).

    With ``require_client_cert`` the peer must present a certificate signed by
    ``tls.ca`` (mutual TLS, the usual DICOM set-up); otherwise one is verified
    when offered.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ValueError("security.tls.require_client_cert needs security.tls.ca")
    return ctx


# --------------------------------------------------------------- association limits
_BUCKETS = 251  # per-host counters are hashed into buckets (collisions only make it stricter)


class AssociationGuard:
    """Counts open associations, in total and per peer host, across processes.

    ``counters`` holds one row of ``1 + _BUCKETS`` integers per receiver process;
    a process writes only its own row (under a thread lock) and reads the sum of
    all rows.  Two processes accepting at the very same instant may both pass, so
    a limit can be exceeded by at most ``processes - 1`` for an instant.
    """

    def __init__(
        self,
        max_total: int,
        max_per_host: int,
        *,
        counters: Any = None,
        index: int = 0,
        processes: int = 1,
    ) -> None:
        if max_total < 1:
            raise ValueError(f"max_total must be >= 1, got {max_total}")
        if max_per_host < 1:
            raise ValueError(f"max_per_host must be >= 1, got {max_per_host}")
        if not 0 <= index < processes:
            raise ValueError(f"index must be in [0, {processes}), got {index}")
        self.max_total = max_total
        self.max_per_host = max_per_host
        self.row = 1 + _BUCKETS
        self.counters = counters if counters is not None else [0] * (self.row * processes)
        self.index = index
        self.processes = processes
        self._lock = threading.Lock()

    @staticmethod
    def _bucket(host: str) -> int:
        return 1 + zlib.crc32(host.encode()) % _BUCKETS

    def _sum(self, offset: int) -> int:
        return sum(self.counters[p * self.row + offset] for p in range(self.processes))

    def acquire(self, host: str) -> str | None:
        """Take a slot for ``host``; the reason when refused, ``None`` when granted."""
        b = self._bucket(host)
        with self._lock:
            if self._sum(0) >= self.max_total:
                return f"too many associations (limit {self.max_total})"
            if self._sum(b) >= self.max_per_host:
                return f"too many associations from one host (limit {self.max_per_host})"
            base = self.index * self.row
            self.counters[base] += 1
            self.counters[base + b] += 1
        return None

    def release(self, host: str) -> None:
        b = self._bucket(host)
        base = self.index * self.row
        with self._lock:
            self.counters[base] = max(0, self.counters[base] - 1)
            self.counters[base + b] = max(0, self.counters[base + b] - 1)

    def reset_row(self, index: int) -> None:
        """Forget the slots of a process that died (called by the parent)."""
        base = index * self.row
        for i in range(self.row):
            self.counters[base + i] = 0


@dataclass(frozen=True)
class _Policy:
    ae_title: str
    allowed_calling_aets: frozenset[str]
    allowed_hosts: frozenset[str]
    handshake_timeout_s: float


class _GuardedACSE(ACSE):
    """ACSE whose acceptor first applies the node's association policy."""

    policy: _Policy
    guard: AssociationGuard
    slot_host: str | None = None

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
        called = str(getattr(rq, "called_ae_title", "") or "").strip()
        host = str(self.assoc.requestor.address)
        reject: tuple[int, int, int] | None = None
        if self.policy.allowed_hosts and host not in self.policy.allowed_hosts:
            reject, why = (0x01, 0x01, 0x01), "host not allowed"
        elif self.policy.allowed_calling_aets and calling not in self.policy.allowed_calling_aets:
            reject, why = (0x01, 0x01, 0x03), "calling AE title not allowed"
        elif called != self.policy.ae_title:
            reject, why = (0x01, 0x01, 0x07), "called AE title is not ours"
        else:
            refused = self.guard.acquire(host)
            if refused:
                reject, why = (0x02, 0x03, 0x02), refused
            else:
                self.slot_host = host
        if reject is not None:
            log.warning("association from %s (calling AE %r) rejected: %s", host, calling, why)
            self.send_reject(*reject)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


class _RequestHandler(RequestHandler):
    """Runs one connection: TLS handshake (with a timeout), the association, clean-up."""

    def handle(self) -> None:
        server = cast("_Server", self.server)
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.settimeout(server.policy.handshake_timeout_s)
                sock.do_handshake()
                sock.settimeout(server.read_timeout_s)
            except (OSError, ssl.SSLError) as exc:
                log.warning(
                    "TLS handshake with %s failed: %s", self.client_address[0], type(exc).__name__
                )
                with contextlib.suppress(OSError):
                    sock.close()
                return
        assoc = self._create_association()
        acse = _GuardedACSE(assoc)
        acse.policy = server.policy
        acse.guard = server.guard
        assoc.acse = acse
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        if acse.slot_host is not None:
            server.guard.release(acse.slot_host)


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT and a deferred TLS handshake."""

    policy: _Policy
    guard: AssociationGuard
    read_timeout_s: float = 60.0
    daemon_threads = True

    def server_bind(self) -> None:
        sock = cast(socket.socket, self.socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(self.server_address)
        self.server_address = sock.getsockname()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom reads a whole PDU with blocking recv(); without a timeout a
        # peer that announces a long PDU and goes quiet holds its thread forever.
        client.settimeout(self.read_timeout_s)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


# --------------------------------------------------------------------------- store
def _status(outcome: StoreOutcome) -> Dataset:
    rsp = Dataset()
    rsp.Status = int(outcome.status)
    if outcome.comment and outcome.status != Status.SUCCESS:
        rsp.ErrorComment = outcome.comment[:64]  # LO: at most 64 characters
    return rsp


class Receiver:
    """One receiver process: an AE bound to ``host:port`` storing into the spool.

    Parameters
    ----------
    cfg:
        The node configuration.
    guard:
        Association counters; a private one when ``None`` (single process).
    """

    def __init__(
        self, cfg: NodeConfig, guard: AssociationGuard | None = None, index: int = 0
    ) -> None:
        sec: SecurityConfig = cfg.security
        self.cfg = cfg
        self.guard = guard or AssociationGuard(sec.max_associations, sec.max_associations_per_host)
        self.spool = Spool(
            cfg.node.spool_dir,
            init_db(cfg.node.resolved_database_url),
            min_free_bytes=sec.min_free_bytes,
            max_instance_bytes=sec.max_instance_bytes,
        )
        self.policy = _Policy(
            ae_title=cfg.node.ae_title,
            allowed_calling_aets=frozenset(sec.allowed_calling_aets),
            allowed_hosts=frozenset(sec.allowed_hosts),
            handshake_timeout_s=sec.acse_timeout_s,
        )
        self.index = index
        self._server: _Server | None = None
        self._old_tempdir: str | None = None
        self._ae: AE | None = None

    # Handlers -----------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> Dataset:
        """C-STORE: make the instance durable, then answer (PS3.4 Annex B.2.3).

        Any exception becomes 0xA700 with a comment, so pynetdicom's generic 0xC211
        never goes out.
        """
        try:
            req = cast(Any, event.request)
            calling = str(event.assoc.requestor.ae_title).strip()
            peer = str(event.assoc.requestor.address)
            path = getattr(event, "dataset_path", None)
            kwargs: dict[str, Any] = {
                "command_sop_class_uid": str(req.AffectedSOPClassUID or ""),
                "command_sop_instance_uid": str(req.AffectedSOPInstanceUID or ""),
                "transfer_syntax_uid": str(event.context.transfer_syntax),
                "calling_ae": calling,
                "peer": peer,
            }
            if path is not None:
                outcome = self.spool.store_file(Path(path), **kwargs)
            else:
                outcome = self.spool.store(event.encoded_dataset(), **kwargs)
        except Exception as exc:
            log.exception("unexpected error in C-STORE handler: %s", type(exc).__name__)
            outcome = StoreOutcome(Status.OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
        if outcome.status != Status.SUCCESS:
            log.warning(
                "C-STORE %s from %s refused with 0x%04X: %s",
                uid_tag(str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")),
                getattr(event.assoc.requestor, "ae_title", "?"),
                int(outcome.status),
                outcome.comment,
            )
        return _status(outcome)

    # Life cycle ---------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Start listening (non-blocking); the bound address."""
        sec = self.cfg.security
        # Process-wide pynetdicom settings, set once in this (receiver) process:
        # data sets stream to temp files in the spool, and the per-PDU standard
        # log handlers are off (they cost time and would format data sets).
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        # Each process streams into its own temp directory and empties it when it
        # (re)starts: a process that died leaves nothing behind for long, and no
        # process ever deletes a transfer another one is still writing.
        tmp_dir = self.spool.tmp / f"p{self.index}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        # pynetdicom's chunked receive writes into tempfile's directory; restored by
        # stop(), so that an in-process receiver does not redirect everyone's temp files.
        self._old_tempdir = tempfile.tempdir
        tempfile.tempdir = str(tmp_dir)
        ae = AE(ae_title=self.cfg.node.ae_title)
        ae.maximum_associations = 10_000  # the guard enforces the real limits
        ae.network_timeout = sec.network_timeout_s
        ae.acse_timeout = sec.acse_timeout_s
        ae.dimse_timeout = sec.dimse_timeout_s
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger P-DATA PDUs
        ae.require_called_aet = False  # checked by the guard
        ae.supported_contexts = [*storage_contexts(), mpps_context()]
        tls = server_tls_context(sec.tls) if sec.tls else None
        server = cast(
            _Server,
            ae.make_server(
                (self.cfg.node.host, self.cfg.node.port),
                ae_title=self.cfg.node.ae_title,
                ssl_context=tls,
                evt_handlers=[
                    (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_C_STORE, self._on_store),
                    *MppsScp(self.spool.db).handlers(),
                ],
                server_class=_Server,
                request_handler=_RequestHandler,
            ),
        )
        server.policy = self.policy
        server.guard = self.guard
        server.read_timeout_s = sec.network_timeout_s
        thread = threading.Thread(target=server.serve_forever, name="receiver-accept", daemon=True)
        thread.start()
        ae._servers.append(server)
        self._server, self._ae = server, ae
        host, port = server.server_address[:2]
        return str(host), int(port)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running associations finish for ``grace_s``, abort the rest."""
        server, ae = self._server, self._ae
        if server is None or ae is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace_s
        # Only established associations can still deliver data worth waiting for;
        # rejected ones linger until the peer closes (ARTIM) and are just aborted.
        while (
            any(a.is_established for a in server.active_associations)
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()
        self.spool.db.dispose()
        self._server = None
        tempfile.tempdir = self._old_tempdir


# ------------------------------------------------------------------------ processes
def _install_stop_handlers(stop: threading.Event) -> None:
    def _handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def _serve_child(cfg: NodeConfig, counters: Any, index: int, processes: int) -> None:
    configure_logging(
        cfg.node.log_level,
        json_lines=cfg.node.log_json,
        show_phi=cfg.node.log_phi,
        stage=f"receiver-{index}",
    )
    stop = threading.Event()
    _install_stop_handlers(stop)
    sec = cfg.security
    guard = AssociationGuard(
        sec.max_associations,
        sec.max_associations_per_host,
        counters=counters,
        index=index,
        processes=processes,
    )
    receiver = Receiver(cfg, guard, index)
    receiver.start()
    while not stop.wait(1.0):
        pass
    receiver.stop()


def run(cfg: NodeConfig) -> None:
    """``airnode receive``: reconcile the spool, listen until SIGTERM/SIGINT, stop cleanly."""
    configure_logging(
        cfg.node.log_level,
        json_lines=cfg.node.log_json,
        show_phi=cfg.node.log_phi,
        stage="receiver",
    )
    sec = cfg.security
    db = init_db(cfg.node.resolved_database_url)
    spool = Spool(
        cfg.node.spool_dir,
        db,
        min_free_bytes=sec.min_free_bytes,
        max_instance_bytes=sec.max_instance_bytes,
    )
    spool.reconcile()
    db.dispose()
    n = cfg.node.receiver_processes
    stop = threading.Event()
    _install_stop_handlers(stop)
    if n == 1:
        receiver = Receiver(cfg)
        host, port = receiver.start()
        log.info(
            "receiver %s listening on %s:%d%s",
            cfg.node.ae_title,
            host,
            port,
            " (TLS)" if sec.tls else "",
        )
        while not stop.wait(1.0):
            pass
        log.info("stopping receiver")
        receiver.stop()
        return
    _run_processes(cfg, n, stop)


def _run_processes(cfg: NodeConfig, n: int, stop: threading.Event) -> None:
    """Supervise ``n`` receiver processes sharing the port; restart any that dies."""
    ctx = multiprocessing.get_context("fork")
    row = 1 + _BUCKETS
    counters: SynchronizedArray[Any] = ctx.Array("i", row * n, lock=False)
    guard = AssociationGuard(1, 1, counters=counters, index=0, processes=n)

    def spawn(i: int) -> multiprocessing.process.BaseProcess:
        p = ctx.Process(target=_serve_child, args=(cfg, counters, i, n), name=f"receiver-{i}")
        p.start()
        return p

    procs: list[multiprocessing.process.BaseProcess] = [spawn(i) for i in range(n)]
    log.info(
        "receiver %s listening on %s:%d with %d processes",
        cfg.node.ae_title,
        cfg.node.host,
        cfg.node.port,
        n,
    )
    while not stop.wait(0.5):
        for i, p in enumerate(procs):
            if not p.is_alive():
                log.error("receiver process %d exited with %s; restarting", i, p.exitcode)
                guard.reset_row(i)
                procs[i] = spawn(i)
    log.info("stopping %d receiver processes", n)
    _stop_all(procs)


def _stop_all(procs: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        if p.is_alive() and p.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
