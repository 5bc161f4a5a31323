"""The node's read-only HTTP endpoint: ``/health``, ``/metrics``, a status page, previews.

Served by the ``http`` stage of ``airnode serve`` on ``[http] host:port`` (loopback by
default: the page shows study activity, so exposing it is a deliberate choice).  Every
figure is read from the job table at request time, so it is the same whichever process
did the work and needs no shared memory between stages.
"""

from __future__ import annotations

from node.ops.http.server import make_server, run

__all__ = ["make_server", "run"]
