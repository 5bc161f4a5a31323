"""``airnode serve``: every stage in its own process, restarted on crash, stopped cleanly.

Why processes and not threads: the GIL would let inference slow down reception, and a
stage that dies (a segfault in a decoder, an out-of-memory kill) must not take the
receiver with it.  Stages share nothing but the spool and the job table, so the
supervisor's only jobs are to start them, notice when one exits, and stop them all.

Children are started with the ``spawn`` start method: a fresh interpreter that imports
only its own stage (``fork`` would copy the supervisor's threads and SQLite handles,
which is undefined behaviour).  Each child gets the same validated, frozen
:class:`~node.config.NodeConfig`, pickled; nothing re-reads the file.

Restart policy (:class:`RestartPolicy`, per stage where a stage names its own): a
stage that exits while the node is running is started again after a capped
exponential back-off (for the receiver at most 0.5 s: :data:`RECEIVER_POLICY`); the
back-off resets once the stage has stayed up for ``stable_after_s``.  A stage that
crashes ``crash_loop_count`` times within ``crash_loop_window_s`` is declared
``fatal``: logged at CRITICAL and not restarted, while the other stages keep running
(reception never stops because inference is broken; the queued work waits in the job
table) and ``/health`` turns 503 so monitoring notices.

Stopping: SIGTERM or SIGINT (Ctrl-C) makes the supervisor forward SIGTERM to every
child, wait up to ``stop_timeout_s`` for them to finish their current item, then
SIGKILL whatever is left, and exit 0.  Nothing queued is lost: jobs live in the job
table, and a job whose worker was killed mid-way is returned to the queue by the
scheduler's lease reaper.  Children ignore SIGINT (a terminal's Ctrl-C reaches the
whole process group; the supervisor alone decides the order of the stop), and ask the
kernel to SIGTERM them if the supervisor itself dies (``PR_SET_PDEATHSIG``), so a
``kill -9`` of the supervisor leaves no orphans behind.

The supervisor writes the state of each stage to ``data_dir/run/stages.json``
(:func:`write_stage_status`) once a second; the HTTP stage reads it for ``/health``.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from node.config import NodeConfig
from node.runtime import setup_logging

__all__ = [
    "RECEIVER_POLICY",
    "RestartPolicy",
    "StageSpec",
    "Supervisor",
    "default_stages",
    "read_stage_status",
    "receiver_stage",
    "run",
    "stage_status_path",
    "write_stage_status",
]

log = logging.getLogger("airnode.supervisor")

#: ``run(cfg, replica)``: the config and the replica index (0 .. replicas - 1).
StageTarget = Callable[[NodeConfig, int], None] | str

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class StageSpec:
    """One stage: a name, what to run, and how many copies.

    ``target`` is either ``"module:function"`` (imported inside the child, so the
    supervisor never imports a stage's heavy dependencies) or a picklable module-level
    callable; either is called as ``target(cfg, replica)``, ``replica`` being the
    process's index among the stage's copies (the worker turns it into its GPU).
    """

    name: str
    target: StageTarget
    replicas: int = 1
    #: This stage's own restart policy (the supervisor's when ``None``).
    policy: RestartPolicy | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"name: {self.name!r} must be a non-empty word (letters, digits, -_)")
        if isinstance(self.target, str):
            mod, _, fn = self.target.partition(":")
            if not mod or not fn:
                raise ValueError(
                    f"target: {self.target!r} must look like 'package.module:function'"
                )
        elif not callable(self.target):
            raise ValueError(f"target: {self.target!r} is neither 'module:function' nor callable")
        if self.replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {self.replicas}")


@dataclass(frozen=True)
class RestartPolicy:
    """How crashed stages are restarted (see the module docstring)."""

    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    stable_after_s: float = 30.0
    crash_loop_count: int = 5
    crash_loop_window_s: float = 60.0
    stop_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if self.base_delay_s <= 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("base_delay_s/max_delay_s: need 0 < base_delay_s <= max_delay_s")
        if self.stable_after_s < 0:
            raise ValueError(f"stable_after_s: must be >= 0, got {self.stable_after_s}")
        if self.crash_loop_count < 1:
            raise ValueError(f"crash_loop_count: must be >= 1, got {self.crash_loop_count}")
        if self.crash_loop_window_s <= 0:
            raise ValueError(f"crash_loop_window_s: must be > 0, got {self.crash_loop_window_s}")
        if self.stop_timeout_s <= 0:
            raise ValueError(f"stop_timeout_s: must be > 0, got {self.stop_timeout_s}")

    def delay(self, consecutive_crashes: int) -> float:
        """Seconds to wait before restart number ``consecutive_crashes`` (1-based)."""
        return min(self.max_delay_s, self.base_delay_s * 2.0 ** max(0, consecutive_crashes - 1))


#: The receiver is what senders see: a crash must reopen the DICOM port within about a
#: second, not after a back-off grown to 30 s.  It is only given up after 30 crashes
#: within a minute.
RECEIVER_POLICY = RestartPolicy(
    base_delay_s=0.1, max_delay_s=0.5, crash_loop_count=30, crash_loop_window_s=60.0
)


def receiver_stage(cfg: NodeConfig) -> StageSpec:
    """The receiver stage: ``receiver_processes`` replicas on one port."""
    return StageSpec(
        "receiver",
        "node.receive:run",
        replicas=cfg.node.receiver_processes,
        policy=RECEIVER_POLICY,
    )


def default_stages(cfg: NodeConfig) -> list[StageSpec]:
    """The stages ``airnode serve`` runs for ``cfg``."""
    stages = [
        receiver_stage(cfg),
        StageSpec("scheduler", "node.schedule.scheduler:run"),
        StageSpec("worker", "node.work.worker:run", replicas=cfg.inference.workers),
        StageSpec("sender", "node.deliver:run"),
    ]
    if cfg.http.enabled:
        stages.append(StageSpec("http", "node.ops.http:run"))
    return stages


# --------------------------------------------------------------------------- child side


def _set_pdeathsig() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (no orphans on kill -9)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _child_main(
    name: str, target: StageTarget, cfg: NodeConfig, parent_pid: int, replica: int = 0
) -> None:
    """Entry point of a stage process (runs in a freshly spawned interpreter)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _set_pdeathsig()
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        sys.exit(0)
    setup_logging(cfg, name)  # until the stage's own start_stage, for import errors
    try:
        if isinstance(target, str):
            mod_name, _, fn_name = target.partition(":")
            fn = getattr(importlib.import_module(mod_name), fn_name)
        else:
            fn = target
        fn(cfg, replica)
    except Exception:
        # Through logging (JSON when configured), not multiprocessing's bare traceback.
        log.critical("stage %s crashed", name, exc_info=True)
        sys.exit(1)


# ---------------------------------------------------------------------- status file


def stage_status_path(cfg: NodeConfig) -> Path:
    """Where the supervisor publishes stage states for ``/health``."""
    return cfg.node.data_dir / "run" / "stages.json"


def write_stage_status(path: Path, status: dict[str, Any]) -> None:
    """Replace the status file atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def read_stage_status(path: Path) -> dict[str, Any] | None:
    """The last published status, or ``None`` when there is none (no supervisor)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------ supervisor side


@dataclass
class _Slot:
    """One process slot of a stage (``worker-0``, ``worker-1``…)."""

    name: str
    spec: StageSpec
    index: int
    process: Any = None  # multiprocessing.process.BaseProcess
    started_at: float = 0.0
    restart_at: float = 0.0
    consecutive: int = 0
    crashes: list[float] = field(default_factory=list)
    restarts: int = 0
    fatal: bool = False
    last_exit: int | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


class Supervisor:
    """Starts the stages, restarts crashed ones, stops them all on request.

    ``stages`` is injectable so that tests run fake stages; :func:`run` uses
    :func:`default_stages`.
    """

    def __init__(
        self,
        cfg: NodeConfig,
        stages: Sequence[StageSpec],
        policy: RestartPolicy | None = None,
        *,
        status_path: Path | None = None,
    ) -> None:
        if not stages:
            raise ValueError("stages: at least one stage is needed")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        self.cfg = cfg
        self.policy = policy or RestartPolicy()
        self.status_path = status_path or stage_status_path(cfg)
        self._ctx = multiprocessing.get_context("spawn")
        self._slots: list[_Slot] = []
        for spec in stages:
            for i in range(spec.replicas):
                name = spec.name if spec.replicas == 1 else f"{spec.name}-{i}"
                self._slots.append(_Slot(name=name, spec=spec, index=i))
        self._stopping = False
        self._started_at = time.time()
        self._last_status = 0.0

    # -- public

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Signal handler: begin the clean stop (idempotent)."""
        if not self._stopping and signum is not None:
            log.info("signal %s: stopping all stages", signal.Signals(signum).name)
        self._stopping = True

    def run(self) -> int:
        """Supervise until a stop is requested; returns the process exit code (0)."""
        old_term = signal.signal(signal.SIGTERM, self.request_stop)
        old_int = signal.signal(signal.SIGINT, self.request_stop)
        try:
            for slot in self._slots:
                self._start(slot)
            self._publish(force=True)
            while not self._stopping:
                self._wait(0.5)
                self._reap_and_restart()
                self._publish()
        finally:
            self._stop_all()
            self._publish(force=True, stopped=True)
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
        log.info("all stages stopped")
        return 0

    def snapshot(self) -> dict[str, Any]:
        """Per-slot state, as published in the status file."""
        t = time.time()
        stages: dict[str, Any] = {}
        for s in self._slots:
            state = "fatal" if s.fatal else "running" if s.alive else "restarting"
            stages[s.name] = {
                "state": state,
                "pid": s.process.pid if s.alive else None,
                "up_s": round(t - s.started_at, 1) if s.alive else 0.0,
                "restarts": s.restarts,
                "last_exit": s.last_exit,
            }
        return {"supervisor_pid": os.getpid(), "started_at": self._started_at, "stages": stages}

    # -- internals

    def _start(self, slot: _Slot) -> None:
        proc = self._ctx.Process(
            target=_child_main,
            args=(slot.name, slot.spec.target, self.cfg, os.getpid(), slot.index),
            name=f"airnode-{slot.name}",
            daemon=False,  # stages may start their own processes
        )
        proc.start()
        slot.process = proc
        slot.started_at = time.time()
        log.info("stage %s started (pid %s)", slot.name, proc.pid)

    def _wait(self, timeout: float) -> None:
        pending = [s.restart_at for s in self._slots if s.process is None and not s.fatal]
        if pending:  # wake up in time for the next scheduled restart
            timeout = max(0.0, min(timeout, min(pending) - time.time()))
        sentinels = [s.process.sentinel for s in self._slots if s.alive]
        if sentinels:
            multiprocessing.connection.wait(sentinels, timeout)
        else:
            time.sleep(timeout)

    def _reap_and_restart(self) -> None:
        t = time.time()
        for slot in self._slots:
            if slot.fatal or self._stopping:
                continue
            proc = slot.process
            if proc is not None and not proc.is_alive():
                proc.join(0)
                slot.last_exit = proc.exitcode
                proc.close()
                slot.process = None
                self._crashed(slot, t)
            elif proc is None and t >= slot.restart_at:
                slot.restarts += 1
                self._start(slot)

    def _crashed(self, slot: _Slot, t: float) -> None:
        policy = slot.spec.policy or self.policy
        if t - slot.started_at >= policy.stable_after_s:
            slot.consecutive = 0
        slot.consecutive += 1
        slot.crashes = [c for c in slot.crashes if t - c < policy.crash_loop_window_s]
        slot.crashes.append(t)
        code = slot.last_exit
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else code
        if len(slot.crashes) >= policy.crash_loop_count:
            slot.fatal = True
            log.critical(
                "stage %s crash loop: exited %d times within %.0f s (last: %s); NOT restarting "
                "it, the other stages keep running; fix the cause and restart airnode",
                slot.name,
                len(slot.crashes),
                policy.crash_loop_window_s,
                how,
            )
            return
        delay = policy.delay(slot.consecutive)
        slot.restart_at = t + delay
        log.error("stage %s exited (%s); restarting in %.1f s", slot.name, how, delay)

    def _stop_all(self) -> None:
        self._stopping = True
        live = [s for s in self._slots if s.alive]
        for s in live:
            with contextlib.suppress(OSError, ValueError):
                s.process.terminate()  # SIGTERM: finish or abandon the current item
        deadline = time.monotonic() + self.policy.stop_timeout_s
        for s in live:
            s.process.join(max(0.0, deadline - time.monotonic()))
        for s in live:
            if s.process.is_alive():
                log.warning(
                    "stage %s did not stop within %.0f s; killing it (its job returns to the "
                    "queue when its lease expires)",
                    s.name,
                    self.policy.stop_timeout_s,
                )
                s.process.kill()
                s.process.join(5.0)
            s.last_exit = s.process.exitcode
        for s in self._slots:
            if s.process is not None and not s.process.is_alive():
                s.process.close()
                s.process = None

    def _publish(self, *, force: bool = False, stopped: bool = False) -> None:
        t = time.time()
        if not force and t - self._last_status < 1.0:
            return
        self._last_status = t
        status = self.snapshot()
        status["updated_at"] = t
        status["stopped"] = stopped
        try:
            write_stage_status(self.status_path, status)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.status_path, exc)


def run(
    cfg: NodeConfig,
    stages: Sequence[StageSpec] | None = None,
    policy: RestartPolicy | None = None,
) -> None:
    """Entry point of ``airnode serve``: migrate the database, then supervise the stages.

    ``stages`` and ``policy`` default to :func:`default_stages` and :class:`RestartPolicy`.
    """
    from node.store.db import init_db

    setup_logging(cfg, "supervisor")
    url = cfg.node.resolved_database_url
    try:
        cfg.node.data_dir.mkdir(parents=True, exist_ok=True)
        db = init_db(url)  # once, before any stage touches it
    except Exception as exc:  # one line for the user; the URL may hold a password
        first = (str(exc).splitlines() or [""])[0][:200]
        log.error(
            "cannot open or migrate the database (%s): %s: %s; check [node] database_url "
            "and data_dir",
            url.split(":", 1)[0],
            type(exc).__name__,
            first,
        )
        raise SystemExit(2) from None
    db.dispose()
    stage_list = list(stages) if stages is not None else default_stages(cfg)
    port_lock = None
    if any(s.target == "node.receive:run" for s in stage_list):
        # Once for all receiver replicas: claim the port (one line and exit 2 when
        # another program or node has it), reconcile the spool before anyone listens.
        from node.receive.server import SUPERVISED_ENV, claim_port, reconcile_spool

        port_lock = claim_port(cfg)
        reconcile_spool(cfg)
        os.environ[SUPERVISED_ENV] = "1"
    log.info(
        "airnode serving: AE %s, DICOM port %d, HTTP %s, stages: %s",
        cfg.node.ae_title,
        cfg.node.port,
        f"port {cfg.http.port}" if cfg.http.enabled else "off",
        ", ".join(f"{s.name}x{s.replicas}" if s.replicas > 1 else s.name for s in stage_list),
    )
    try:
        code = Supervisor(cfg, stage_list, policy).run()
    finally:
        if port_lock is not None:
            port_lock.close()
    if code:
        sys.exit(code)
