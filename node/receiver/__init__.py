"""The DICOM receiver stage (``airnode receive``): C-ECHO and C-STORE into the spool.

:mod:`node.receiver.storage` keeps the acknowledgement contract (durable file plus
committed row before 0x0000); :mod:`node.receiver.server` is the network side
(association policy, TLS, several processes on one port).  See ``docs/receiver.md``.
"""

from __future__ import annotations

from node.receiver.server import TRANSFER_SYNTAXES, AssociationGuard, Receiver, run
from node.receiver.storage import HeaderInfo, Spool, Status, StoreOutcome, parse_header, uid_path

__all__ = [
    "TRANSFER_SYNTAXES",
    "AssociationGuard",
    "HeaderInfo",
    "Receiver",
    "Spool",
    "Status",
    "StoreOutcome",
    "parse_header",
    "run",
    "uid_path",
]
