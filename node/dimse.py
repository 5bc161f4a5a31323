"""Small DICOM SCU helpers shared by the CLI and the sender (no pixel decoding here)."""

from __future__ import annotations

import ssl
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

__all__ = ["client_tls_context", "echo"]


def client_tls_context(cert: Any = None, key: Any = None, ca: Any = None) -> ssl.SSLContext:
    """A TLS 1.2+ client context (PS3.15 Annex B, BCP 195) that verifies the peer."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # DICOM peers are addressed by IP; the CA is what we trust
    if cert and key:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def echo(
    host: str,
    port: int,
    *,
    ae_title: str = "ANY-SCP",
    calling_ae_title: str = "AIRNODE",
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> int:
    """C-ECHO the peer; the DIMSE status (0 = success), or 0xA700-style codes on failure.

    Returns -1 when no association could be made (refused, unreachable, timeout).
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    tls_args = (tls, host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else -1
    finally:
        assoc.release()
