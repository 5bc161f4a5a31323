"""The inference worker: claims ``infer`` jobs and turns a study into DICOM results.

For each job: load the series named in the job from the spool → run the model
package's predictor (pre-process → backend → post-process) → encode SR, heatmap
SCs and SEG → write them durably to the outbox with one ``send`` job per
destination → mark the job done.  Result UIDs are deterministic, so a worker killed
anywhere in between re-runs the job after its lease expires and produces the same
objects; the outbox and the send jobs are idempotent on those UIDs, so nothing is
stored or sent twice.

One worker runs per GPU (or one on the CPU); each loads a model's backend once and
reuses it across studies.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import pydicom
from sqlalchemy import select, update

from node.config import NodeConfig
from node.logs import configure_logging, uid_tag
from node.store import jobs
from node.store.db import Database, Instance, Job, JobKind, JobStatus, init_db, now

if TYPE_CHECKING:
    from models.package import ModelPackage
    from models.pipeline import Predictor

__all__ = ["PHASES", "Worker", "run"]

log = logging.getLogger(__name__)

#: The phases recorded in an infer job's ``payload["timings"]``, in pipeline order.
PHASES = (
    "load_model",
    "load",
    "preprocess",
    "inference",
    "postprocess",
    "encode",
    "store",
    "total",
)


@dataclass
class _Heartbeat:
    """Extends a job's lease in the background while the job runs."""

    db: Database
    job_id: int
    owner: str
    lease_s: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        interval = max(0.5, self.lease_s / 3)
        while not self._stop.wait(interval):
            try:
                jobs.heartbeat(self.db, self.job_id, self.owner, self.lease_s)
            except Exception:  # a missed beat is retried; the lease has slack
                log.warning("lease heartbeat for job %s failed", self.job_id, exc_info=True)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _pid_alive(pid_text: str) -> bool:
    """Whether a process with this pid exists here (a non-number counts as alive)."""
    try:
        pid = int(pid_text)
    except ValueError:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class Worker:
    """Claims and runs infer jobs; one instance per process."""

    def __init__(
        self,
        cfg: NodeConfig,
        db: Database,
        *,
        owner: str | None = None,
        lease_s: float = 300.0,
        policy: jobs.RetryPolicy | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.cfg = cfg
        self.db = db
        self.owner = owner or f"worker:{jobs.default_owner()}"
        # The heartbeat renews the lease every lease_s / 3; the reaper in the
        # scheduler returns the job to the queue once a dead worker's lease runs out.
        self.lease_s = lease_s
        self.policy = policy or jobs.RetryPolicy(max_attempts=3, base_delay_s=5.0, max_delay_s=60.0)
        self._packages: dict[str, ModelPackage] | None = None
        self._predictors: dict[str, Predictor] = {}
        self.stopping = threading.Event()

    # -- model packages and backends, loaded once per process -------------------------
    @property
    def packages(self) -> dict[str, ModelPackage]:
        if self._packages is None:
            from models.package import find_packages

            self._packages = find_packages(self.cfg.inference.model_dirs)
            log.info("model packages: %s", ", ".join(sorted(self._packages)) or "none")
        return self._packages

    def predictor(self, name: str, version: str) -> Predictor:
        """The loaded predictor for ``name`` at ``version``.

        A package installed or upgraded while the worker runs is picked up: on a miss
        the model folders are scanned again before the job is given up, and a
        predictor of an older version is dropped.
        """
        pkg = self.packages.get(name)
        if pkg is None or pkg.version != version:
            self._packages = None
            pkg = self.packages.get(name)
            cached = self._predictors.get(name)
            if cached is not None and (pkg is None or cached.package.version != pkg.version):
                cached.backend.close()
                del self._predictors[name]
        if pkg is None:
            raise jobs.PermanentJobError(
                f"model {name!r} is not installed (looked in "
                f"{', '.join(str(d) for d in self.cfg.inference.model_dirs)})"
            )
        if pkg.version != version:
            raise jobs.PermanentJobError(
                f"model {name!r} is version {pkg.version}, the job asked for {version}"
            )
        if name not in self._predictors:
            from models.backends import create_backend
            from models.pipeline import Predictor

            try:
                backend = create_backend(
                    self.cfg.inference.backend, pkg, self.cfg.inference.intra_op_threads
                )
            except Exception as exc:  # a broken model file or a missing library
                raise jobs.PermanentJobError(
                    f"model {name!r} could not be loaded with backend "
                    f"{self.cfg.inference.backend!r}: {exc}"
                ) from exc
            self._predictors[name] = Predictor(
                pkg, backend, batch_size=self.cfg.inference.batch_size
            )
            log.info("loaded %s %s on %s", name, version, backend.name)
        return self._predictors[name]

    # -- one job ----------------------------------------------------------------------
    def load_series(self, sop_uids: list[str]) -> dict[str, list[pydicom.Dataset]]:
        """Read the job's instances from the spool, grouped by series."""
        spool = self.cfg.node.spool_dir
        with self.db.read() as s:
            rows = s.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sop_uids))).all()
        if len(rows) != len(set(sop_uids)):
            missing = len(set(sop_uids)) - len(rows)
            raise jobs.PermanentJobError(f"{missing} instance(s) of the job are no longer stored")
        series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
        for row in rows:
            try:
                ds = pydicom.dcmread(spool / row.path)
            except Exception as exc:
                raise jobs.PermanentJobError(
                    f"cannot read instance {uid_tag(row.sop_instance_uid)}: {exc}"
                ) from exc
            series[row.series_instance_uid].append(ds)
        return dict(series)

    def process(self, job: Job) -> dict[str, Any]:
        """Run one infer job; returns the payload to store with the finished job.

        ``payload["timings"]`` holds seconds per phase, summed over the job's series:
        ``load_model`` (backend load, paid once per process and model), ``load``
        (reading the instances from the spool), ``preprocess``, ``inference``,
        ``postprocess``, ``encode`` (SR, SC, SEG), ``store`` (outbox + send jobs) and
        ``total``.  The metrics endpoint and ``bench/e2e.py`` read them.
        """
        from models.guards import check_input
        from node.results import encode_all
        from node.store.outbox import store_results

        payload = dict(job.payload)
        model = str(payload.get("model", ""))
        version = str(payload.get("model_version", ""))
        sop_uids = [str(u) for u in payload.get("sop_instance_uids", [])]
        if not model or not sop_uids:
            raise jobs.PermanentJobError("job payload names no model or no instances")
        t0 = time.perf_counter()
        predictor = self.predictor(model, version)
        timings: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        timings["load_model"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        series = self.load_series(sop_uids)
        timings["load"] = time.perf_counter() - t1

        result_uids: list[str] = []
        not_analysed: list[dict[str, Any]] = []
        for series_uid, datasets in sorted(series.items()):
            # The manifest's input guards: a series the model was not made for gets no
            # output at all, and the job records why (models/guards.py).
            reasons = check_input(predictor.package.manifest, datasets)
            if reasons:
                not_analysed.append({"series_instance_uid": series_uid, "reasons": reasons})
                log.warning(
                    "job %s: series %s not analysed by %s: %s",
                    job.id,
                    uid_tag(series_uid),
                    model,
                    "; ".join(reasons),
                )
                continue
            try:
                result = predictor.predict(datasets)
            except jobs.JobError:
                raise
            except (ValueError, NotImplementedError, AttributeError, KeyError) as exc:
                raise jobs.PermanentJobError(f"input not usable by the model: {exc}") from exc
            for k in ("preprocess", "inference", "postprocess"):
                timings[k] += float(result.timings.get(k, 0.0))
            timings["load_model"] += float(result.timings.get("load", 0.0))
            t2 = time.perf_counter()
            objects = encode_all(result, datasets, self.cfg)
            timings["encode"] += time.perf_counter() - t2
            t3 = time.perf_counter()
            stored = store_results(
                self.db,
                self.cfg.node.outbox_dir,
                objects,
                model=model,
                infer_job_id=job.id,
                destinations=list(payload.get("destinations", [])),
                max_attempts=self.cfg.send.max_attempts,
            )
            timings["store"] += time.perf_counter() - t3
            result_uids.extend(r.sop_instance_uid for r in stored)
        timings["total"] = time.perf_counter() - t0
        payload["timings"] = {k: round(v, 6) for k, v in timings.items()}
        payload["result_sop_instance_uids"] = result_uids
        if not_analysed:
            payload["not_analysed"] = not_analysed
        return payload

    def release_orphans(self) -> int:
        """Requeue infer jobs held by dead worker processes of this host; returns how many.

        A worker killed with ``kill -9`` (or by the OOM killer) leaves its job
        ``running`` until the lease runs out.  When the supervisor restarts the stage,
        the new process looks for leases owned by ``worker:<this host>:<pid>`` whose
        pid no longer exists, expires them and runs the reaper, so the job is claimed
        again at once instead of after ``lease_s``.  Should two hosts share a host
        name, a live worker's job may be run twice; results and send jobs are
        idempotent on their UIDs, so nothing is stored or sent twice.
        """
        prefix = f"worker:{socket.gethostname()}:"
        with self.db.read() as s:
            owners = s.scalars(
                select(Job.lease_owner).where(
                    Job.kind == JobKind.INFER,
                    Job.status == JobStatus.RUNNING,
                    Job.lease_owner.startswith(prefix, autoescape=True),
                )
            ).all()
        dead = {o for o in owners if o is not None and not _pid_alive(o.removeprefix(prefix))}
        if not dead:
            return 0
        with self.db.session() as s:
            s.execute(
                update(Job)
                .where(Job.status == JobStatus.RUNNING, Job.lease_owner.in_(dead))
                .values(lease_expires_at=now() - 1.0)
            )
        n = jobs.reap_expired(self.db, self.policy)
        log.warning("requeued %d job(s) of stopped worker process(es)", n)
        return n

    def run_one(self) -> bool:
        """Claim and run one job; ``False`` when there was nothing to do."""
        job = jobs.claim(self.db, JobKind.INFER, self.owner, self.lease_s)
        if job is None:
            return False
        log.info(
            "job %s: %s %s on study %s (attempt %s)",
            job.id,
            job.payload.get("model"),
            job.payload.get("model_version"),
            uid_tag(job.study_instance_uid),
            job.attempts,
        )
        try:
            with _Heartbeat(self.db, job.id, self.owner, self.lease_s):
                out = self.process(job)
        except Exception as exc:
            transient = isinstance(exc, jobs.TransientJobError | OSError)
            status = jobs.fail(self.db, job, self.owner, exc, self.policy, transient=transient)
            # A JobError is an expected outcome with its reason; anything else is a bug
            # worth its traceback in the log.
            log.error(
                "job %s failed (%s): %s",
                job.id,
                status,
                exc,
                exc_info=not isinstance(exc, jobs.JobError),
            )
            return True
        if not jobs.complete(self.db, job.id, self.owner, payload=out):
            # The lease ran out and the reaper gave the job to another worker; its
            # run writes the same objects (deterministic UIDs), so nothing is lost.
            log.warning("job %s finished after its lease was lost; left to its new owner", job.id)
            return True
        log.info(
            "job %s done: %d result object(s) in %.2f s",
            job.id,
            len(out["result_sop_instance_uids"]),
            out["timings"]["total"],
        )
        return True

    def serve_forever(self, poll_s: float = 0.2) -> None:
        while not self.stopping.is_set():
            if not self.run_one():
                self.stopping.wait(poll_s)


def run(cfg: NodeConfig) -> None:
    """Entry point of ``airnode work``: run until SIGTERM or Ctrl-C."""
    configure_logging(
        cfg.node.log_level, json_lines=cfg.node.log_json, show_phi=cfg.node.log_phi, stage="worker"
    )
    db = init_db(cfg.node.resolved_database_url)
    worker = Worker(cfg, db)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: finishing the current job, then stopping", signum)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _ = worker.packages  # load the manifests up front: a broken package shows at start
    worker.release_orphans()
    worker.serve_forever()
    db.dispose()
