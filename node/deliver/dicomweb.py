"""STOW-RS client (PS3.18 §10.5): the DICOMweb transport of the sender.

One POST per batch to ``{url}/studies``: a ``multipart/related; type="application/dicom"``
body streamed from the outbox files (never held whole in memory), with a
``Content-Length`` so that any origin server accepts it.  The response's Referenced SOP
Sequence (0008,1199) and Failed SOP Sequence (0008,1198) say what happened to each
instance.

How outcomes map onto the job life cycle (same rules as C-STORE, :mod:`node.deliver.status`):

* listed in Referenced SOP Sequence → done;
* listed in Failed SOP Sequence → the Failure Reason classified like a C-STORE status
  (0xA7xx transient; 0xA9xx, 0xCxxx, 0x0122 permanent);
* HTTP 5xx, 408, 429, timeouts, refused or reset connections, TLS errors → transient;
* any other 4xx (400, 401, 403, 404, 413, 415…) → permanent: a resend cannot succeed
  until someone changes the configuration or the server;
* 2xx without a parseable body, or an instance missing from the body → transient.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from node.config import DestinationConfig
from node.deliver.status import Outcome, classify, describe
from node.dimse import client_tls_context

__all__ = ["StowOutcome", "WebError", "stow"]

_CHUNK = 256 * 1024


class WebError(Exception):
    """The request as a whole failed; ``transient`` says whether to retry."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass
class StowOutcome:
    """Per SOP Instance UID: ``(Outcome, reason)``."""

    http_status: int
    results: dict[str, tuple[Outcome, str]] = field(default_factory=dict)


def _tls(dest: DestinationConfig) -> ssl.SSLContext:
    tls = dest.tls
    ctx = client_tls_context(
        tls.cert if tls else None, tls.key if tls else None, tls.ca if tls else None
    )
    ctx.check_hostname = True  # an https URL names its host: verify it
    return ctx


def _headers(dest: DestinationConfig, boundary: str, length: int) -> dict[str, str]:
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(length),
        "Accept": "application/dicom+json",
    }
    if dest.auth_header_env:
        value = os.environ.get(dest.auth_header_env)
        if not value:
            raise WebError(
                f"environment variable {dest.auth_header_env} (auth_header_env of "
                f"{dest.name}) is not set",
                transient=False,
            )
        headers["Authorization"] = value
    return headers


def _body(files: list[Path], boundary: str) -> tuple[int, Iterator[bytes]]:
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(head) + f.stat().st_size + 2 for f in files) + len(tail)

    def gen() -> Iterator[bytes]:
        for f in files:
            yield head
            with f.open("rb") as src:
                while chunk := src.read(_CHUNK):
                    yield chunk
            yield b"\r\n"
        yield tail

    return length, gen()


def _sequence(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    seq = body.get(tag, {}).get("Value", [])
    return [item for item in seq if isinstance(item, dict)]


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def stow(dest: DestinationConfig, files: dict[str, Path]) -> StowOutcome:
    """POST ``files`` (SOP Instance UID → Part 10 file) to ``dest``; per-instance outcomes.

    Raises :class:`WebError` when the request as a whole failed.
    """
    assert dest.url is not None
    parts = urlsplit(dest.url.rstrip("/") + "/studies")
    boundary = uuid.uuid4().hex
    length, body = _body(list(files.values()), boundary)
    headers = _headers(dest, boundary, length)
    conn: http.client.HTTPConnection
    try:
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                parts.netloc, timeout=dest.timeout_s, context=_tls(dest)
            )
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=dest.timeout_s)
        try:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", target, body, headers)
            rsp = conn.getresponse()
            status, raw = rsp.status, rsp.read(16 * 1024 * 1024)
        finally:
            conn.close()
    except ssl.SSLError as exc:
        raise WebError(f"TLS error with {dest.url}: {exc.reason or exc}", transient=True) from None
    except (OSError, http.client.HTTPException) as exc:
        raise WebError(
            f"no answer from {dest.url}: {type(exc).__name__}: {exc}", transient=True
        ) from None
    return _outcome(dest, status, raw, list(files))


def _outcome(dest: DestinationConfig, status: int, raw: bytes, uids: list[str]) -> StowOutcome:
    where = f"STOW-RS to {dest.name}"
    if status >= 500 or status in (408, 429):
        raise WebError(f"{where}: HTTP {status}", transient=True)
    if status >= 400 and status != 409:
        text = raw[:200].decode("utf-8", "replace").strip()
        raise WebError(f"{where}: HTTP {status}" + (f": {text}" if text else ""), transient=False)
    if status >= 300:
        raise WebError(f"{where}: HTTP {status} (redirects are not followed)", transient=False)
    try:
        body = json.loads(raw) if raw.strip() else {}
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        if status == 200:  # all stored; the body is optional in practice
            return StowOutcome(status, {u: (Outcome.SUCCESS, "HTTP 200") for u in uids})
        raise WebError(
            f"{where}: HTTP {status} with an unreadable body", transient=status != 409
        ) from None
    out = StowOutcome(status)
    for item in _sequence(body, "00081199"):
        uid = _value(item, "00081155")
        if uid in uids:
            out.results[str(uid)] = (Outcome.SUCCESS, f"HTTP {status}")
    for item in _sequence(body, "00081198"):
        uid, reason = _value(item, "00081155"), _value(item, "00081197")
        if uid in uids:
            code = int(reason) if isinstance(reason, int) else None
            outcome = classify(code) if code is not None else Outcome.TRANSIENT
            if outcome is Outcome.SUCCESS:  # a failure item without a failure code
                outcome = Outcome.TRANSIENT
            out.results[str(uid)] = (outcome, f"{where}: failure reason {describe(code)}")
    for uid in uids:
        if uid not in out.results:
            if status == 200 and not body.get("00081198"):
                out.results[uid] = (Outcome.SUCCESS, "HTTP 200")
            else:
                out.results[uid] = (Outcome.TRANSIENT, f"{where}: HTTP {status}, not in the answer")
    return out
