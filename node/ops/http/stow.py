"""STOW-RS (PS3.18 §10.5): ``POST /dicomweb/studies[/{study}]`` into the receive stage's spool.

The same acknowledgement contract as C-STORE: the HTTP answer goes out only once every
instance that it lists as stored is durable (fsynced, linked, directory fsynced) and
its ``instances`` row committed, because each part goes through
:meth:`node.receive.spool.Spool.store_file` exactly like a C-STORE data set does.

The request body is never held whole in memory.  It streams through a small
``multipart/related`` parser (RFC 2387, RFC 2046 §5.1) straight into one temp file per
part in ``spool/tmp/http/<request>/`` (the spool's own file system, so the final link
is atomic); the whole body is received and checked before anything is stored, so a
malformed, oversize or wrongly typed request stores nothing.  The temp directory is
removed when the request ends, whatever happens; a killed process leaves it for the
stage's next start (:func:`clear_temp`) or the spool's reconciliation.

HTTP statuses (PS3.18 Table 10.5.3-1): 200 all stored; 202 some stored, some failed;
409 none stored; 503 none stored only for lack of resources (retry later); 400
malformed multipart body; 413 a part over ``security.max_instance_bytes`` or a body
over ``http.stow_max_request_bytes``; 415 anything but ``multipart/related;
type="application/dicom"``.  The body (``application/dicom+json``, PS3.18 §F.2) lists
each instance in Referenced SOP Sequence (0008,1199) or Failed SOP Sequence
(0008,1198) with its Failure Reason (0008,1197).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from node.logs import uid_tag
from node.receive.headers import ParseError, parse_header
from node.receive.server import TRANSFER_SYNTAXES
from node.receive.spool import Spool, Status, StoreOutcome

__all__ = [
    "CALLING_AE",
    "FailureReason",
    "StowError",
    "StowResult",
    "StowService",
    "clear_temp",
    "failure_reason",
]

log = logging.getLogger("airnode.http.stow")

#: The calling AE title recorded for instances stored over STOW-RS (routes can match it
#: with ``CallingAETitle``).
CALLING_AE = "DICOMWEB"

_CHUNK = 256 * 1024
_MAX_HEADER_BYTES = 16 * 1024
_MAX_LINE = 4096
_DRAIN_ON_REFUSAL = 1024 * 1024
_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{1,70}$")  # RFC 2046 bchars


class FailureReason:
    """Failure Reason (0008,1197) values used in STOW-RS responses (PS3.18 §10.5.3,
    the C-STORE failure statuses of PS3.4 Annex B.2.3)."""

    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


def failure_reason(status: Status) -> int:
    """The PS3.18 Failure Reason for a spool :class:`Status` other than success.

    0xA7xx stays "out of resources" (the client may retry); 0xA900 stays "data set does
    not match SOP class"; our 0xC210 (cannot parse) and 0xC001 (too large) are both
    "cannot understand" (0xC000): permanent, do not retry.
    """
    if status == Status.OUT_OF_RESOURCES:
        return FailureReason.OUT_OF_RESOURCES
    if status == Status.DATASET_MISMATCH:
        return FailureReason.DATASET_MISMATCH
    if status in (Status.CANNOT_UNDERSTAND, Status.TOO_LARGE):
        return FailureReason.CANNOT_UNDERSTAND
    return FailureReason.PROCESSING_FAILURE


class StowError(Exception):
    """The request as a whole is refused with HTTP ``status`` (nothing is stored)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------ body reader


class Stream(Protocol):
    """The request's socket file (``BaseHTTPRequestHandler.rfile``)."""

    def read1(self, size: int, /) -> bytes: ...

    def readline(self, size: int, /) -> bytes: ...


class _Body:
    """The request body as a stream: ``Content-Length`` or chunked, at most ``limit`` bytes.

    ``headers`` are keyed in lower case.

    Going past ``limit`` raises 413; a body that ends early raises 400.
    """

    def __init__(self, rfile: Stream, headers: Mapping[str, str], limit: int) -> None:
        self.rfile = rfile
        self.limit = limit
        self.read_total = 0
        te = (headers.get("transfer-encoding") or "").strip().lower()
        length = headers.get("content-length")
        self.chunked = te == "chunked"
        if te and not self.chunked:
            raise StowError(400, f"unsupported Transfer-Encoding {te!r}")
        self.remaining: int | None = None  # bytes left in the body or the current chunk
        self.done = False
        if not self.chunked:
            if length is None:
                raise StowError(411, "Content-Length or chunked body required")
            try:
                n = int(length)
            except ValueError:
                raise StowError(400, "invalid Content-Length") from None
            if n < 0:
                raise StowError(400, "invalid Content-Length")
            if n > limit:
                raise StowError(413, f"request of {n} bytes exceeds the limit of {limit} bytes")
            self.remaining = n

    def _line(self) -> bytes:
        try:
            line = self.rfile.readline(_MAX_LINE + 1)
        except TimeoutError:
            raise StowError(408, "the request body stopped arriving") from None
        if not line.endswith(b"\n"):
            raise StowError(400, "malformed chunked body")
        return line.rstrip(b"\r\n")

    def read(self, n: int = _CHUNK) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the end of the body."""
        if self.done:
            return b""
        if self.chunked and not self.remaining:
            # The CRLF after the previous chunk's data.
            if self.remaining == 0 and self._line() != b"":
                raise StowError(400, "malformed chunked body")
            try:
                size = int(self._line().split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise StowError(400, "malformed chunked body") from None
            if size < 0:
                raise StowError(400, "malformed chunked body")
            if size == 0:
                while self._line() != b"":  # trailers
                    pass
                self.done = True
                return b""
            if self.read_total + size > self.limit:
                raise StowError(413, f"request exceeds the limit of {self.limit} bytes")
            self.remaining = size
        assert self.remaining is not None
        if self.remaining == 0:
            self.done = True
            return b""
        try:
            # read1: what has arrived, at most one socket read (read() would wait for n).
            data = self.rfile.read1(min(n, self.remaining))
        except TimeoutError:
            raise StowError(408, "the request body stopped arriving") from None
        if not data:
            raise StowError(400, "request body ended early")
        self.remaining -= len(data)
        self.read_total += len(data)
        if self.read_total > self.limit:
            raise StowError(413, f"request exceeds the limit of {self.limit} bytes")
        return data

    def drain(self, cap: int | None = None) -> None:
        """Read and discard the rest, or ``cap`` more bytes at most: a socket closed with
        unread data is reset, and the client may then never read our answer."""
        n = 0
        with contextlib.suppress(StowError, OSError):
            while (cap is None or n < cap) and (data := self.read()):
                n += len(data)


# ------------------------------------------------------------------ multipart parser


def boundary_of(content_type: str | None) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` Content-Type.

    415 for any other media type (including the metadata + bulk data form,
    ``type="application/dicom+json"``, which this node does not accept); 400 when the
    boundary is missing or invalid.
    """
    if not content_type:
        raise StowError(415, 'Content-Type must be multipart/related; type="application/dicom"')
    media, _, rest = content_type.partition(";")
    params: dict[str, str] = {}
    for item in _split_params(rest):
        key, sep, value = item.partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"')
    media_type = media.strip().lower()
    part_type = params.get("type", "application/dicom").strip().lower()
    if media_type != "multipart/related" or part_type != "application/dicom":
        raise StowError(
            415,
            f"unsupported media type {media_type!r} (type {part_type!r}); "
            'send multipart/related; type="application/dicom"',
        )
    boundary = params.get("boundary")
    if not boundary or not _BOUNDARY_RE.match(boundary) or boundary.endswith(" "):
        raise StowError(400, "multipart/related body without a valid boundary")
    return boundary


def _split_params(text: str) -> list[str]:
    out, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def _part_type(raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise StowError(400, "part headers are not ASCII") from None
    ctype = ""
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise StowError(400, "malformed part header")
        if name.strip().lower() == "content-type":
            ctype = value.split(";", 1)[0].strip().lower()
    return ctype


def receive_parts(body: _Body, boundary: str, tmp_dir: Path, max_part_bytes: int) -> list[Path]:
    """Stream every part of the body into its own file in ``tmp_dir``; their paths.

    Each part must be ``application/dicom`` (or carry no Content-Type) and at most
    ``max_part_bytes`` long; the body must end with the close delimiter.
    """
    delim = b"\r\n--" + boundary.encode("ascii")
    # The first delimiter may open the body without a CRLF before it (RFC 2046 §5.1.1).
    buf = b"\r\n"
    parts: list[Path] = []

    def fill() -> bool:
        nonlocal buf
        data = body.read()
        if not data:
            return False
        buf += data
        return True

    # Preamble: everything before the first delimiter is ignored.
    while (i := buf.find(delim)) < 0:
        buf = buf[-(len(delim) - 1) :]
        if not fill():
            raise StowError(400, "no multipart boundary in the body")
    buf = buf[i + len(delim) :]
    while True:
        while len(buf) < 2:
            if not fill():
                raise StowError(400, "multipart body ended after a boundary")
        if buf.startswith(b"--"):
            break  # close delimiter; the epilogue is ignored
        # Transport padding, CRLF, then the part headers up to an empty line.
        while buf.find(b"\r\n\r\n") < 0:
            if len(buf) > _MAX_HEADER_BYTES:
                raise StowError(400, "part headers too long")
            if not fill():
                raise StowError(400, "multipart body ended inside part headers")
        eol = buf.find(b"\r\n")
        if buf[:eol].strip(b" \t"):
            raise StowError(400, "malformed multipart boundary line")
        end = buf.find(b"\r\n\r\n", eol)
        raw_headers, buf = buf[eol + 2 : end], buf[end + 4 :]
        ctype = _part_type(raw_headers) if raw_headers else ""
        if ctype not in ("", "application/dicom"):
            raise StowError(415, f"part of type {ctype!r}; every part must be application/dicom")
        path = tmp_dir / f"{len(parts):06d}.dcm"
        parts.append(path)
        size = 0
        with path.open("xb") as out:
            while True:
                i = buf.find(delim)
                if i >= 0:
                    chunk, buf = buf[:i], buf[i + len(delim) :]
                else:
                    keep = len(delim) - 1
                    chunk, buf = buf[: max(0, len(buf) - keep)], buf[max(0, len(buf) - keep) :]
                size += len(chunk)
                if size > max_part_bytes:
                    raise StowError(
                        413,
                        f"part {len(parts)} exceeds max_instance_bytes ({max_part_bytes} bytes)",
                    )
                out.write(chunk)
                if i >= 0:
                    break
                if not fill():
                    raise StowError(400, "multipart body ended inside a part")
    if not parts:
        raise StowError(400, "multipart body without any part")
    return parts


# ------------------------------------------------------------------------ the service


@dataclass
class StowResult:
    """The HTTP status and the PS3.18 response data set (DICOM JSON, PS3.18 Annex F)."""

    status: int
    stored: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str | None, str | None, int]] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        def item(cls: str | None, inst: str | None) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if cls:
                out["00081150"] = {"vr": "UI", "Value": [cls]}
            if inst:
                out["00081155"] = {"vr": "UI", "Value": [inst]}
            return out

        body: dict[str, Any] = {}
        if self.failed:
            body["00081198"] = {
                "vr": "SQ",
                "Value": [
                    {**item(c, i), "00081197": {"vr": "US", "Value": [reason]}}
                    for c, i, reason in self.failed
                ],
            }
        if self.stored:
            body["00081199"] = {"vr": "SQ", "Value": [item(c, i) for c, i in self.stored]}
        return body


class StowService:
    """Receives STOW-RS requests into ``spool``; one per HTTP server, thread-safe."""

    def __init__(self, spool: Spool, *, max_request_bytes: int) -> None:
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        self.spool = spool
        self.max_request_bytes = max_request_bytes
        self.tmp_root = temp_root(spool)
        self.tmp_root.mkdir(parents=True, exist_ok=True)

    def handle(
        self,
        headers: Mapping[str, str],
        rfile: Stream,
        *,
        study_uid: str | None,
        peer: str | None,
    ) -> StowResult:
        """Receive, check and store one request; raises :class:`StowError` for a refusal
        of the whole request (nothing stored then)."""
        body = _Body(rfile, headers, self.max_request_bytes)
        try:
            boundary = boundary_of(headers.get("content-type"))
        except StowError:
            body.drain(_DRAIN_ON_REFUSAL)
            raise
        try:
            self.tmp_root.mkdir(parents=True, exist_ok=True)
            tmp_dir = Path(tempfile.mkdtemp(prefix="stow-", dir=self.tmp_root))
        except OSError as exc:
            raise StowError(503, f"cannot write the request: {exc.strerror or exc}") from None
        try:
            try:
                parts = receive_parts(body, boundary, tmp_dir, self.spool.max_instance_bytes)
                body.drain(_DRAIN_ON_REFUSAL)  # the epilogue, if any
            except StowError as exc:
                # An oversize part: the rest of a body within the request limit is read
                # so that the client sees the 413; other refusals read a little.
                if exc.status != 408:  # a stalled client would stall the drain too
                    body.drain(None if exc.status == 413 else _DRAIN_ON_REFUSAL)
                raise
            except OSError as exc:
                raise StowError(503, f"cannot write the request: {exc.strerror or exc}") from None
            return self._store_all(parts, study_uid, peer)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    def _store_all(self, parts: list[Path], study_uid: str | None, peer: str | None) -> StowResult:
        result = StowResult(200)
        transient_only = True
        for path in parts:
            cls, inst, outcome = self._store_one(path, study_uid, peer)
            if outcome.status == Status.SUCCESS:
                assert cls is not None and inst is not None
                result.stored.append((cls, inst))
                continue
            transient_only = transient_only and outcome.status == Status.OUT_OF_RESOURCES
            log.warning(
                "STOW-RS instance %s refused (0x%04X): %s",
                uid_tag(inst or ""),
                int(outcome.status),
                outcome.comment,
            )
            result.failed.append((cls, inst, failure_reason(outcome.status)))
        if result.failed:
            result.status = 202 if result.stored else 503 if transient_only else 409
        return result

    def _store_one(
        self, path: Path, study_uid: str | None, peer: str | None
    ) -> tuple[str | None, str | None, StoreOutcome]:
        try:
            _add_preamble(path)
            info = parse_header(path)
            ts = _transfer_syntax(path)
        except ParseError as exc:
            return None, None, StoreOutcome(Status.CANNOT_UNDERSTAND, str(exc))
        except OSError as exc:
            return None, None, StoreOutcome(Status.OUT_OF_RESOURCES, str(exc.strerror or exc))
        cls, inst = info.sop_class_uid, info.sop_instance_uid
        if ts not in TRANSFER_SYNTAXES:
            return cls, inst, StoreOutcome(Status.CANNOT_UNDERSTAND, f"transfer syntax {ts}")
        if study_uid is not None and info.study_instance_uid != study_uid:
            return (
                cls,
                inst,
                StoreOutcome(
                    Status.DATASET_MISMATCH, "Study Instance UID differs from the request URL"
                ),
            )
        outcome = self.spool.store_file(
            path,
            command_sop_class_uid=cls,
            command_sop_instance_uid=inst,
            transfer_syntax_uid=ts,
            calling_ae=CALLING_AE,
            peer=peer,
        )
        return cls, inst, outcome


def _add_preamble(path: Path) -> None:
    """Give a part that starts with its File Meta Information (no 128-byte preamble and
    ``DICM`` prefix, as pydicom writes without ``enforce_file_format``, which
    dicomweb-client uses) the PS3.10 §7.1 header, so that it is stored as a Part 10 file."""
    with path.open("rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM" or not head.startswith(b"\x02\x00"):
        return
    fixed = path.with_suffix(".p10")
    with path.open("rb") as src, fixed.open("xb") as dst:
        dst.write(b"\0" * 128 + b"DICM")
        shutil.copyfileobj(src, dst, _CHUNK)
    fixed.replace(path)


def _transfer_syntax(path: Path) -> str:
    """The Transfer Syntax UID of a Part 10 file's meta information (PS3.10 §7.1)."""
    import pydicom.filereader

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        return str(meta.TransferSyntaxUID)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise ParseError(f"no valid File Meta Information: {type(exc).__name__}") from None


def temp_root(spool: Spool) -> Path:
    """Where the HTTP stage writes requests being received: in the spool's own file system."""
    return spool.tmp / "http"


def clear_temp(spool: Spool) -> None:
    """Remove what a killed HTTP stage left (call at its start, before serving)."""
    shutil.rmtree(temp_root(spool), ignore_errors=True)
