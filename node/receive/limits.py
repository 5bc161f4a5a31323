"""What a peer may consume before and after it is trusted: PDU size, time, temp disk.

pynetdicom reads a PDU by trusting its length field: a header that claims 4 GiB
makes it buffer whatever follows, and each ``recv`` of a peer trickling one byte a
second resets the socket timeout, so such a peer is never cut.  Data set fragments
stream to a temp file whose size and the disk's free space are only known to the
C-STORE handler once the whole instance has arrived.  This module closes those
gaps for each association of the receiver:

- :class:`BoundedDUL` reads each PDU itself: the length field is checked against
  our maximum before anything is buffered (PS3.8 §9.3.1: a P-DATA-TF PDU may not
  exceed the Maximum Length we announced in the A-ASSOCIATE-AC, §D.1; an
  association-phase PDU has its own, fixed bound); the whole PDU must arrive by a
  deadline: until the association is established, the negotiation deadline counted
  from the connection's accept; afterwards ``read_timeout_s`` plus the time the
  PDU's length takes at ``min_rate_bytes_per_s``.  A PDU over its bound or its
  deadline ends the association (A-ABORT, as for an invalid PDU, PS3.8 §9.2 AA-8).
- :class:`BoundedDIMSE` watches the temp file of the data set being received:
  past ``max_instance_bytes``, or when free space falls below ``min_free_bytes``,
  the file is removed at once, the rest of the data set is read and discarded,
  and the C-STORE is answered 0xC001 or 0xA700 (:attr:`BoundedDIMSE.refused`).
- every temp file an association creates is recorded (through the
  ``tempfile.mkstemp`` audit event of the reactor thread), so that
  :func:`remove_temp_files` deletes what is left when the association ends, for
  whatever reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_P_ABORT

__all__ = [
    "ASSOCIATION_PDU_MAX",
    "BoundedDIMSE",
    "BoundedDUL",
    "Limits",
    "Refusal",
    "install",
    "remove_temp_files",
]

log = logging.getLogger(__name__)

#: Largest A-ASSOCIATE-RQ (or any other non-P-DATA PDU) read: 128 presentation
#: contexts with a dozen transfer syntaxes each stay far below it.
ASSOCIATION_PDU_MAX = 1024 * 1024
#: Free space is checked again each time this many more bytes were written.
_FREE_CHECK_EVERY = 4 * 1024 * 1024
_PDU_TYPES = frozenset(range(0x01, 0x08))

#: Status and comment of a C-STORE refused while its data set streamed in.
Refusal = tuple[int, str]


@dataclass(frozen=True)
class Limits:
    """The bounds of one association (from ``[security]``)."""

    max_pdu_bytes: int
    negotiation_s: float
    read_timeout_s: float
    min_rate_bytes_per_s: float
    max_instance_bytes: int
    min_free_bytes: int
    spool_root: Path


# ------------------------------------------------------------- temp file tracking
_track = threading.local()
_hook_lock = threading.Lock()
_hook_installed = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "tempfile.mkstemp":
        files = getattr(_track, "files", None)
        if files is not None:
            files.add(str(args[0]))


def _install_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            sys.addaudithook(_audit)
            _hook_installed = True


def remove_temp_files(files: set[str]) -> int:
    """Delete the temp files of an association that ended; how many were left."""
    removed = 0
    for name in list(files):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
            removed += 1
        files.discard(name)
    return removed


class _Discard:
    """Stands in for the temp file of a refused data set: the rest is read and dropped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.file = self

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# -------------------------------------------------------------------------- DUL
class BoundedDUL(DULServiceProvider):
    """pynetdicom's DUL with a bounded PDU read (see the module docstring)."""

    limits: Limits
    opened_at: float

    def _recv_exactly(self, raw: socket.socket, n: int, deadline: float) -> bytearray | None:
        """``n`` bytes by ``deadline``; ``None`` when the peer closed or was too slow."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            raw.settimeout(min(left, self.limits.read_timeout_s))
            try:
                k = raw.recv_into(view[got:], min(n - got, 1 << 20))
            except (OSError, TimeoutError):
                return None
            if k == 0:
                return None
            got += k
        return buf

    def _read_pdu_data(self) -> None:
        sock = self.socket
        raw = getattr(sock, "socket", None)
        if raw is None:
            self.event_queue.put("Evt17")
            return
        lim = self.limits
        start = time.monotonic()
        deadline = start + lim.read_timeout_s
        # Sta1 too: the reactor reads the first bytes before it handles Evt5 (connect).
        negotiating = not self.assoc.is_established and self.state_machine.current_state in (
            "Sta1",
            "Sta2",
            "Sta3",
        )
        if negotiating:
            deadline = min(deadline, self.opened_at + lim.negotiation_s)
        header = self._recv_exactly(raw, 6, deadline)
        if header is None:
            if time.monotonic() >= deadline:
                log.info("closing connection from %s: no PDU header in time", self._peer())
            self._closed(negotiating)  # or closed by the peer: the usual end
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_TYPES:
            log.warning("unknown PDU type 0x%02X from %s; aborting", pdu_type, self._peer())
            self.event_queue.put("Evt19")
            return
        cap = lim.max_pdu_bytes + 1024 if pdu_type == 0x04 else ASSOCIATION_PDU_MAX
        if length > cap:
            log.warning(
                "PDU of %d bytes announced by %s exceeds our limit of %d; aborting",
                length,
                self._peer(),
                cap,
            )
            self.event_queue.put("Evt19")
            return
        if not negotiating:
            deadline = start + lim.read_timeout_s + length / lim.min_rate_bytes_per_s
        body = self._recv_exactly(raw, length, deadline)
        raw.settimeout(lim.read_timeout_s)
        if body is None:
            log.info("closing connection from %s: PDU of %d bytes not received in time",
                     self._peer(), length)  # fmt: skip
            self._closed(negotiating)
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:
            log.warning("undecodable PDU from %s: %s", self._peer(), type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _peer(self) -> str:
        return str(getattr(self.assoc.requestor, "address", "?"))

    def _closed(self, negotiating: bool) -> None:
        # Evt17 (transport closed) ends the association from any state (PS3.8 §9.2).
        self.event_queue.put("Evt17")
        if negotiating:
            # The acceptor waits for an A-ASSOCIATE-RQ primitive for acse_timeout;
            # an A-P-ABORT in its place ends that wait at once.
            self.to_user_queue.put(A_P_ABORT())


# ------------------------------------------------------------------------ DIMSE
class BoundedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider that limits the data set being received."""

    limits: Limits
    temp_files: set[str]
    refused: dict[str, Refusal]
    _watched: Any = None
    _next_free_check: int = 0

    def receive_primitive(self, primitive: Any) -> None:
        _track.files = self.temp_files
        try:
            super().receive_primitive(primitive)
        finally:
            _track.files = None
        msg = self.message
        f = getattr(msg, "_data_set_file", None) if msg is not None else None
        if f is None or isinstance(f, _Discard):
            return
        if msg is not self._watched:
            self._watched, self._next_free_check = msg, 0
        size = f.tell()
        lim = self.limits
        refusal: Refusal | None = None
        if size > lim.max_instance_bytes:
            refusal = (
                0xC001,
                f"instance exceeds max_instance_bytes {lim.max_instance_bytes}",
            )
        elif size >= self._next_free_check:
            self._next_free_check = size + _FREE_CHECK_EVERY
            try:
                free = shutil.disk_usage(lim.spool_root).free
            except OSError:
                free = 0
            if free < lim.min_free_bytes:
                refusal = (0xA700, f"disk space below reserve ({free} bytes free)")
        if refusal is not None:
            name = str(f.name)
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(OSError):
                os.unlink(name)
            self.temp_files.discard(name)
            msg._data_set_file = _Discard(name)  # type: ignore[union-attr]
            self.refused[name] = refusal
            log.warning(
                "C-STORE from %s refused while streaming (0x%04X): %s",
                getattr(self.assoc.requestor, "address", "?"),
                refusal[0],
                refusal[1],
            )


def install(assoc: Any, limits: Limits) -> set[str]:
    """Bound ``assoc`` (an acceptor not yet started); returns its temp-file record.

    The C-STORE handler finds the refusals of the association in
    ``assoc.dimse.refused`` (temp file name → status, comment).
    """
    _install_hook()
    dul = assoc.dul
    dul.__class__ = BoundedDUL
    dul.limits = limits
    dul.opened_at = time.monotonic()
    dimse = assoc.dimse
    dimse.__class__ = BoundedDIMSE
    dimse.limits = limits
    files: set[str] = set()
    dimse.temp_files = files
    dimse.refused = {}
    return files
