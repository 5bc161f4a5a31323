"""The sender stage: ``airnode send`` delivers outbox objects to the destinations."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from node.config import NodeConfig
from node.deliver.sender import Sender

__all__ = ["Sender", "run"]


def run(cfg: NodeConfig) -> None:
    """Run the sender until SIGTERM or SIGINT (called by ``airnode send``)."""
    from node.logs import configure_logging
    from node.store.db import init_db

    configure_logging(
        cfg.node.log_level, json_lines=cfg.node.log_json, show_phi=cfg.node.log_phi, stage="sender"
    )
    db = init_db(cfg.node.resolved_database_url)
    stop = threading.Event()

    def _stop(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        Sender(cfg, db).run(stop)
    finally:
        db.dispose()
