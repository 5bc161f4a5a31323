"""The receive stage (``airnode receive``): C-ECHO and C-STORE into the spool.

:mod:`node.receive.headers` reads the identifying UIDs of a data set;
:mod:`node.receive.spool` keeps the acknowledgement contract (durable file plus
committed row before 0x0000), committing concurrent rows together through
:mod:`node.receive.commit`; :mod:`node.receive.server` is the network side
(association policy, TLS, several processes on one port).  See ``docs/receiver.md``.
"""

from __future__ import annotations

from node.receive.headers import HeaderInfo, parse_header
from node.receive.server import TRANSFER_SYNTAXES, AssociationGuard, Receiver, run
from node.receive.spool import Spool, Status, StoreOutcome
from node.store.durable import uid_path

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
