"""The sender stage: ``airnode send`` delivers outbox objects to the destinations."""

from __future__ import annotations

from node.config import NodeConfig
from node.deliver.sender import Sender
from node.runtime import start_stage

__all__ = ["Sender", "run"]


def run(cfg: NodeConfig, replica: int = 0) -> None:
    """Run the sender until SIGTERM or SIGINT (called by ``airnode send``)."""
    stage = start_stage(cfg, "sender", replica)
    db = stage.open_db()
    try:
        Sender(cfg, db).run(stage.stopping)
    finally:
        db.dispose()
