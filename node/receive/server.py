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
  bound to one GIL: replicas of the receiver stage run by the one supervisor
  (:mod:`node.ops.supervisor`), with the association limits shared through a small
  file of counters mapped by each (one row per replica, zeroed when it is replaced);
  the port is claimed once by their owner (:func:`claim_port`), so no other program
  or second node can share it;
- pynetdicom's chunked receive (``STORE_RECV_CHUNKED_DATASET``) with its temp files in
  ``spool/tmp``: a data set goes from the socket to a file on the spool's own file
  system and is hard-linked into place, never held whole in memory.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from node.config import NodeConfig, SecurityConfig, TlsConfig
from node.logs import uid_tag
from node.receive.limits import Limits, Refusal, install, remove_temp_files
from node.receive.mpps import MppsScp, mpps_context
from node.receive.spool import Spool, Status, StoreOutcome
from node.runtime import start_stage
from node.store.db import Database, open_db

__all__ = [
    "SUPERVISED_ENV",
    "TRANSFER_SYNTAXES",
    "AssociationGuard",
    "Receiver",
    "claim_port",
    "reconcile_spool",
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
    """ACSE whose acceptor first applies the node's association policy.

    The association slot itself is taken when the connection is accepted
    (:class:`_RequestHandler`), so half-open connections count as well.
    """

    policy: _Policy
    release_slot: Callable[[], None]

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        if not isinstance(rq, A_ASSOCIATE):  # the connection ended before a request
            self.release_slot()
            self.assoc.kill()
            return
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
        if reject is not None:
            log.warning("association from %s (calling AE %r) rejected: %s", host, calling, why)
            # A rejected peer may keep its socket open until ARTIM expires; its
            # slot is free from now on.
            self.release_slot()
            self.send_reject(*reject)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


#: A-ASSOCIATE-RJ, rejected-transient, service-provider (presentation), local limit
#: exceeded (PS3.8 §9.3.4): sent in place of reading the request of a connection
#: over the association limits.
_RJ_LIMIT = bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x02, 0x03, 0x02])


class _RequestHandler(RequestHandler):
    """Runs one connection: a slot, TLS handshake (with a timeout), the association,
    clean-up of its slot and temp files however it ends."""

    def handle(self) -> None:
        server = cast("_Server", self.server)
        sock = self.request
        host = str(self.client_address[0])
        refused = server.guard.acquire(host)
        if refused:
            log.warning("connection from %s refused: %s", host, refused)
            if not isinstance(sock, ssl.SSLSocket):
                with contextlib.suppress(OSError):
                    sock.sendall(_RJ_LIMIT)
            return
        files: set[str] = set()
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                server.guard.release(host)

        try:
            if isinstance(sock, ssl.SSLSocket):
                try:
                    sock.settimeout(server.policy.handshake_timeout_s)
                    sock.do_handshake()
                    sock.settimeout(server.limits.read_timeout_s)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("TLS handshake with %s failed: %s", host, type(exc).__name__)
                    return
            assoc = self._create_association()
            files = install(assoc, server.limits)
            acse = _GuardedACSE(assoc)
            acse.policy = server.policy
            acse.release_slot = release
            assoc.acse = acse
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
        finally:
            release()
            if remove_temp_files(files):
                log.info("removed the partial transfer of an association from %s", host)


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT and a deferred TLS handshake."""

    policy: _Policy
    guard: AssociationGuard
    limits: Limits
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections during a burst.
    request_queue_size = 256

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
        # The bounded DUL (node.receive.limits) sets its own deadline per recv.
        client.settimeout(self.limits.read_timeout_s)
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
            self._open_db(cfg),
            min_free_bytes=sec.min_free_bytes,
            max_instance_bytes=sec.max_instance_bytes,
        )
        self.policy = _Policy(
            ae_title=cfg.node.ae_title,
            allowed_calling_aets=frozenset(sec.allowed_calling_aets),
            allowed_hosts=frozenset(sec.allowed_hosts),
            handshake_timeout_s=sec.acse_timeout_s,
        )
        self.limits = Limits(
            max_pdu_bytes=sec.max_pdu_bytes,
            negotiation_s=sec.acse_timeout_s,
            read_timeout_s=sec.network_timeout_s,
            min_rate_bytes_per_s=sec.min_rate_bytes_per_s,
            max_instance_bytes=sec.max_instance_bytes,
            min_free_bytes=sec.min_free_bytes,
            spool_root=cfg.node.spool_dir,
        )
        self.index = index
        self._server: _Server | None = None
        self._old_tempdir: str | None = None
        self._ae: AE | None = None

    @staticmethod
    def _open_db(cfg: NodeConfig) -> Database:
        url, timeout = cfg.node.resolved_database_url, cfg.security.db_lock_timeout_s
        if os.environ.get(SUPERVISED_ENV) == "1":  # migrated by the supervisor: start fast
            return Database(url, busy_timeout_s=timeout)
        return open_db(url, busy_timeout_s=timeout)

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
            refused: dict[str, Refusal] = getattr(event.assoc.dimse, "refused", {})
            refusal = refused.pop(str(path), None) if path else None
            if refusal is not None:  # refused while streaming in (node.receive.limits)
                return _status(StoreOutcome(Status(refusal[0]), refusal[1]))
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
        # Announced in the A-ASSOCIATE-AC; larger PDUs are refused before buffering.
        ae.maximum_pdu_size = sec.max_pdu_bytes
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
        server.limits = self.limits
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
#: Set by the process that owns the DICOM port (``airnode serve``, or ``airnode
#: receive`` with several replicas) for the receiver replicas it starts: the port was
#: checked, the database migrated and the spool reconciled once, by the owner.
SUPERVISED_ENV = "AIRNODE_RECEIVER_SUPERVISED"


def claim_port(cfg: NodeConfig) -> socket.socket:
    """Make this process the one owner of the DICOM port, or exit with one line.

    Replicas bind with ``SO_REUSEPORT``, which would also let a second, misconfigured
    node (same user) bind the port silently and take a share of the connections.  So
    the owner first takes a machine-wide name for the port (an abstract Unix socket,
    released by the kernel when the process ends, even on ``kill -9``): a second
    airnode is refused.  Then it checks that nothing else listens there: a foreign
    program using ``SO_REUSEPORT`` is refused too.  Keep the returned socket open for
    as long as the receivers run.
    """
    host, port = cfg.node.host, cfg.node.port
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0airnode-dicom-port-{port}")
    except OSError:
        lock.close()
        log.error(
            "another airnode already serves DICOM port %d on this machine; "
            "stop it or set [node] port",
            port,
        )
        raise SystemExit(2) from None
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    with socket.socket(socket.AF_INET6 if ":" in probe_host else socket.AF_INET) as probe:
        probe.settimeout(1.0)
        taken = probe.connect_ex((probe_host, port)) == 0
    if taken:
        lock.close()
        log.error(
            "another program already listens on DICOM port %d (%s); stop it or set [node] port",
            port,
            host,
        )
        raise SystemExit(2)
    return lock


def reconcile_spool(cfg: NodeConfig) -> dict[str, int]:
    """Bring the spool and its rows in line (at start-up, before any replica listens)."""
    sec = cfg.security
    db = open_db(cfg.node.resolved_database_url, busy_timeout_s=sec.db_lock_timeout_s)
    try:
        spool = Spool(
            cfg.node.spool_dir,
            db,
            min_free_bytes=sec.min_free_bytes,
            max_instance_bytes=sec.max_instance_bytes,
        )
        return spool.reconcile()
    finally:
        db.dispose()


def _shared_counters(cfg: NodeConfig, processes: int) -> Any:
    """The association counters of all replicas: a small file mapped by each of them.

    One row per replica, written only by its owner (reset when it starts, so a
    replica that died frees its slots when it is replaced), summed by everyone.
    """
    path = cfg.node.data_dir / "run" / f"receiver-{cfg.node.port}.slots"
    path.parent.mkdir(parents=True, exist_ok=True)
    size = processes * (1 + _BUCKETS) * 4
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        mapped = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return memoryview(mapped).cast("i")


def run(cfg: NodeConfig, replica: int = 0) -> None:
    """``airnode receive`` (or one receiver replica): listen until SIGTERM/SIGINT.

    Alone, it claims the port and reconciles the spool first.  As one of
    ``receiver_processes`` replicas started by the supervisor (``SUPERVISED_ENV``),
    the supervisor did both, and the replica starts at once: it is what stands
    between a crash and the DICOM port being open again.
    """
    stage = start_stage(cfg, "receiver", replica)
    sec = cfg.security
    lock: socket.socket | None = None
    if os.environ.get(SUPERVISED_ENV) != "1":
        lock = claim_port(cfg)
        reconcile_spool(cfg)
    n = cfg.node.receiver_processes
    index = replica if n > 1 else 0
    guard = None
    if n > 1:
        guard = AssociationGuard(
            sec.max_associations,
            sec.max_associations_per_host,
            counters=_shared_counters(cfg, n),
            index=index,
            processes=n,
        )
        guard.reset_row(index)
    stop = stage.stopping
    try:
        receiver = Receiver(cfg, guard, index)
        host, port = receiver.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.node.host, cfg.node.port, exc.strerror or exc)
        raise SystemExit(2) from None
    log.info(
        "receiver %s listening on %s:%d%s%s",
        cfg.node.ae_title,
        host,
        port,
        " (TLS)" if sec.tls else "",
        f" (replica {index + 1} of {n})" if n > 1 else "",
    )
    while not stop.wait(1.0):
        pass
    log.info("stopping receiver")
    receiver.stop()
    if lock is not None:
        lock.close()
