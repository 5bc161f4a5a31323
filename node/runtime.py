"""The stage runtime: what every stage process does once at start, written once.

A stage (``airnode receive|schedule|work|send``, the HTTP stage, the supervisor) is a
process whose ``run(cfg, replica)`` begins with :func:`start_stage`, which

* sets up logging, labelled with the stage and its replica (``worker-1``);
* turns SIGTERM (and SIGINT, unless the supervisor told the process to ignore it so
  that a terminal's Ctrl-C reaches the supervisor alone) into :attr:`Stage.stopping`,
  an event the stage's loop waits on, so it finishes its current item and returns;
* carries the replica index the supervisor gave the process (``0`` for a stage started
  by hand), which the worker turns into its GPU (:func:`models.backends.device_for_replica`);
* opens the database without migrating it (:meth:`Stage.open_db`): a schema that is
  behind makes the stage refuse to start with one line saying to run
  ``airnode db upgrade`` (:class:`node.store.db.SchemaError`).

Stages may import this module; it imports only the store and the shared modules.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from types import FrameType

from node.config import NodeConfig
from node.logs import configure_logging
from node.store.db import Database, open_db

__all__ = ["Stage", "setup_logging", "stage_label", "start_stage"]

log = logging.getLogger(__name__)


def stage_label(name: str, replica: int = 0) -> str:
    """``worker`` for replica 0, ``worker-1`` for the next, as logs and status show them."""
    return name if replica == 0 else f"{name}-{replica}"


def setup_logging(cfg: NodeConfig, label: str) -> None:
    """Logging for this process as ``[node]`` configures it, labelled ``label``."""
    configure_logging(
        cfg.node.log_level, json_lines=cfg.node.log_json, show_phi=cfg.node.log_phi, stage=label
    )


@dataclass
class Stage:
    """One running stage process: its config, name, replica index and stop event."""

    cfg: NodeConfig
    name: str
    replica: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.replica < 0:
            raise ValueError(f"replica: must be >= 0, got {self.replica}")

    @property
    def label(self) -> str:
        return stage_label(self.name, self.replica)

    def open_db(self) -> Database:
        """The job table, schema checked, never migrated (see :func:`node.store.db.open_db`)."""
        return open_db(self.cfg.node.resolved_database_url)

    def stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Ask the stage to stop after its current item (also the signal handler)."""
        if signum is not None and not self.stopping.is_set():
            log.info("%s: signal %s, stopping", self.label, signal.Signals(signum).name)
        self.stopping.set()


def start_stage(cfg: NodeConfig, name: str, replica: int = 0) -> Stage:
    """Set up this process as stage ``name`` (logging, signal handlers); see the module."""
    stage = Stage(cfg, name, replica)
    setup_logging(cfg, stage.label)
    signal.signal(signal.SIGTERM, stage.stop)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, stage.stop)
    return stage
