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
import socket
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pydicom
from sqlalchemy import select, update

from node.config import NodeConfig
from node.logs import mask_phi, uid_tag
from node.runtime import start_stage
from node.store import jobs
from node.store.db import Database, Instance, Job, JobKind, JobStatus, Study, now
from node.store.payloads import InferPayload, PayloadError

if TYPE_CHECKING:
    from models.package import ModelPackage
    from models.pipeline import Predictor
    from models.result import InferenceResult

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


def _first_line(exc: BaseException) -> str:
    """A one-line reason without UIDs or names (they may be in pydicom's messages)."""
    text = (str(exc).splitlines() or [""])[0] or type(exc).__name__
    return mask_phi(text)[:200]


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
        device_index: int | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.cfg = cfg
        self.db = db
        #: The GPU this worker's backends run on (``None``: no GPU, the CPU).
        self.device_index = device_index
        self.owner = owner or f"worker:{jobs.default_owner()}"
        # The heartbeat renews the lease every lease_s / 3; the reaper in the
        # scheduler returns the job to the queue once a dead worker's lease runs out.
        self.lease_s = lease_s
        self.policy = policy or jobs.retry_policies(cfg.send)[JobKind.INFER]
        self._packages: dict[str, dict[str, ModelPackage]] | None = None
        self._predictors: dict[tuple[str, str], Predictor] = {}
        self.stopping = threading.Event()

    @classmethod
    def for_replica(cls, cfg: NodeConfig, db: Database, replica: int) -> Worker:
        """Worker replica ``replica`` of ``inference.workers``: one GPU per replica.

        It runs on GPU ``replica`` modulo the GPUs this process may see
        (``CUDA_VISIBLE_DEVICES`` respected), or on the CPU when there is none, so N
        workers on an N-GPU machine use one GPU each.
        """
        from models.backends import device_for_replica

        return cls(cfg, db, device_index=device_for_replica(replica))

    # -- model packages and backends, loaded once per process -------------------------
    @property
    def packages(self) -> dict[str, dict[str, ModelPackage]]:
        """Model name → version → package, read the same way the scheduler reads them."""
        if self._packages is None:
            from models.package import discover_packages

            self._packages = discover_packages(self.cfg.inference.model_dirs)
            log.info(
                "model packages: %s",
                ", ".join(f"{n} {v}" for n in sorted(self._packages) for v in self._packages[n])
                or "none",
            )
        return self._packages

    def predictor(self, name: str, version: str) -> Predictor:
        """The loaded predictor for ``name`` at ``version`` (the one the job names).

        A package installed or upgraded while the worker runs is picked up: on a miss
        the model folders are scanned again before the job is given up, and
        predictors of versions no longer installed are dropped.
        """
        pkg = self.packages.get(name, {}).get(version)
        if pkg is None:
            self._packages = None
            pkg = self.packages.get(name, {}).get(version)
            for key in [k for k in self._predictors if k[1] not in self.packages.get(k[0], {})]:
                self._predictors.pop(key).backend.close()
        if pkg is None:
            installed = sorted(self.packages.get(name, {}))
            if installed:
                raise jobs.PermanentJobError(
                    f"model {name!r} is version {', '.join(installed)}, the job asked for {version}"
                )
            raise jobs.PermanentJobError(
                f"model {name!r} is not installed (looked in "
                f"{', '.join(str(d) for d in self.cfg.inference.model_dirs)})"
            )
        if (name, version) not in self._predictors:
            from models.backends import create_backend
            from models.pipeline import Predictor

            try:
                backend = create_backend(
                    self.cfg.inference.backend,
                    pkg,
                    self.cfg.inference.intra_op_threads,
                    self.device_index,
                )
            except Exception as exc:  # a broken model file or a missing library
                raise jobs.PermanentJobError(
                    f"model {name!r} could not be loaded with backend "
                    f"{self.cfg.inference.backend!r}: {exc}"
                ) from exc
            self._predictors[name, version] = Predictor(
                pkg, backend, batch_size=self.cfg.inference.batch_size
            )
            log.info("loaded %s %s on %s (%s)", name, version, backend.name, backend.device)
        return self._predictors[name, version]

    # -- one job ----------------------------------------------------------------------
    def load_series(
        self, sop_uids: list[str]
    ) -> tuple[dict[str, list[pydicom.Dataset]], dict[str, str]]:
        """Read the job's instances from the spool, grouped by series.

        Also returns the instances that cannot be parsed completely (SOP Instance
        UID → reason): they are left out, never handed to a model.  The parse is
        complete (every element, nested sequences included), since pydicom reads
        lazily and a bad VR deep in a sequence would otherwise surface mid-model.
        """
        spool = self.cfg.node.spool_dir
        with self.db.read() as s:
            rows = s.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sop_uids))).all()
        if len(rows) != len(set(sop_uids)):
            missing = len(set(sop_uids)) - len(rows)
            raise jobs.PermanentJobError(f"{missing} instance(s) of the job are no longer stored")
        series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
        unreadable: dict[str, str] = {}
        for row in rows:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(spool / row.path)
                    for _ in ds.iterall():
                        pass
            except OSError:
                raise  # the disk, not the instance: transient
            except Exception as exc:
                unreadable[row.sop_instance_uid] = f"cannot parse: {_first_line(exc)}"
                continue
            series[row.series_instance_uid].append(ds)
        return dict(series), unreadable

    def _predict(
        self, predictor: Predictor, datasets: list[pydicom.Dataset], unreadable: dict[str, str]
    ) -> InferenceResult | None:
        """``predictor.predict`` on the series; an image that cannot be decoded (a
        corrupt stream, a decoder's panic) is set aside and the rest predicted again."""
        from models.preprocess import PixelDecodeError, decode_frames

        try:
            return predictor.predict(datasets)
        except PixelDecodeError:
            pass
        usable = []
        for ds in datasets:
            try:
                decode_frames(ds)
            except PixelDecodeError as exc:
                unreadable[str(ds.SOPInstanceUID)] = _first_line(exc)
            else:
                usable.append(ds)
        if not usable:
            return None
        return predictor.predict(usable)

    def process(self, job: Job) -> InferPayload:
        """Run one infer job; returns the payload to store with the finished job.

        ``payload["timings"]`` holds seconds per phase, summed over the job's series:
        ``load_model`` (backend load, paid once per process and model), ``load``
        (reading the instances from the spool), ``preprocess``, ``inference``,
        ``postprocess``, ``encode`` (SR, SC, SEG), ``store`` (outbox + send jobs) and
        ``total``.  The metrics endpoint and ``bench/e2e.py`` read them.
        """
        from models.guards import check_input
        from node.results import encode_all, predecessor_for
        from node.store.outbox import store_results

        try:
            payload = InferPayload.of(job)
        except PayloadError as exc:
            raise jobs.PermanentJobError(str(exc)) from None
        model, version, sop_uids = payload.model, payload.model_version, payload.sop_instance_uids
        t0 = time.perf_counter()
        predictor = self.predictor(model, version)
        timings: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        timings["load_model"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        series, unreadable = self.load_series(sop_uids)
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
                result = self._predict(predictor, datasets, unreadable)
            except jobs.JobError:
                raise
            except (ValueError, NotImplementedError, AttributeError, KeyError) as exc:
                raise jobs.PermanentJobError(f"input not usable by the model: {exc}") from exc
            if result is None:  # no image of this series could be decoded
                continue
            for k in ("preprocess", "inference", "postprocess"):
                timings[k] += float(result.timings.get(k, 0.0))
            timings["load_model"] += float(result.timings.get("load", 0.0))
            t2 = time.perf_counter()
            # Objects carry the job's creation time and name the SR they replace, so a
            # re-run of this job writes the same bytes (node/results/uids.py).
            objects = encode_all(
                result,
                datasets,
                self.cfg,
                made_at=datetime.fromtimestamp(job.created_at),
                predecessor=predecessor_for(self.db, result),
            )
            timings["encode"] += time.perf_counter() - t2
            t3 = time.perf_counter()
            stored = store_results(
                self.db,
                self.cfg.node.outbox_dir,
                objects,
                model=model,
                infer_job_id=job.id,
                destinations=payload.destinations,
                max_attempts=self.cfg.send.max_attempts,
                objects={d.name: d.objects for d in self.cfg.destinations},
                priority=job.priority,
            )
            timings["store"] += time.perf_counter() - t3
            result_uids.extend(r.sop_instance_uid for r in stored)
        if unreadable:
            self._note_unreadable(job, unreadable, len(set(sop_uids)))
            payload = payload.model_copy(
                update={"unreadable": {uid_tag(u): why for u, why in sorted(unreadable.items())}}
            )
            if len(unreadable) >= len(set(sop_uids)):
                first = next(iter(unreadable.values()))
                raise jobs.PermanentJobError(
                    f"no readable instance ({len(unreadable)} unreadable, e.g. {first})"
                )
        timings["total"] = time.perf_counter() - t0
        return payload.model_copy(
            update={
                "timings": {k: round(v, 6) for k, v in timings.items()},
                "result_sop_instance_uids": result_uids,
                "not_analysed": not_analysed or None,
            }
        )

    def _note_unreadable(self, job: Job, unreadable: dict[str, str], total: int) -> None:
        """Log the unreadable instances and note them on the study (status page,
        ``airnode studies list``); UIDs only as tags."""
        first = next(iter(unreadable.values()))
        note = f"{len(unreadable)} of {total} instance(s) unreadable, left out: {first}"
        for uid, why in sorted(unreadable.items()):
            log.warning("job %s: instance %s left out: %s", job.id, uid_tag(uid), why)
        if job.study_instance_uid:
            with self.db.session() as s:
                s.execute(
                    update(Study)
                    .where(Study.study_instance_uid == job.study_instance_uid)
                    .values(note=note[:500])
                )

    def release_orphans(self) -> int:
        """Requeue jobs held by dead worker processes of this host; returns how many.

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
        if dead:
            with self.db.session() as s:
                s.execute(
                    update(Job)
                    .where(Job.status == JobStatus.RUNNING, Job.lease_owner.in_(dead))
                    .values(lease_expires_at=now() - 1.0)
                )
        n = jobs.reap_expired(self.db)
        if n:
            log.warning("requeued %d job(s) of stopped process(es)", n)
        return n

    def run_one(self) -> bool:
        """Claim and run one job; ``False`` when there was nothing to do."""
        job = jobs.claim(self.db, JobKind.INFER, self.owner, self.lease_s)
        if job is None:
            return False
        log.info(
            "job %s: infer on study %s (attempt %s)",
            job.id,
            uid_tag(job.study_instance_uid),
            job.attempts,
        )
        try:
            with _Heartbeat(self.db, job.id, self.owner, self.lease_s):
                out = self.process(job)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # pyo3's PanicException too: the job fails, not us
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
            "job %s done: %s %s, %d result object(s) in %.2f s",
            job.id,
            out.model,
            out.model_version,
            len(out.result_sop_instance_uids or []),
            (out.timings or {}).get("total", 0.0),
        )
        return True

    def serve_forever(self, poll_s: float = 0.2) -> None:
        while not self.stopping.is_set():
            if not self.run_one():
                self.stopping.wait(poll_s)


def run(cfg: NodeConfig, replica: int = 0) -> None:
    """Entry point of ``airnode work``: run until SIGTERM or Ctrl-C.

    ``replica`` comes from the supervisor (``inference.workers`` copies) or
    ``--replica``; it picks the GPU (:meth:`Worker.for_replica`).
    """
    stage = start_stage(cfg, "worker", replica)
    db = stage.open_db()
    worker = Worker.for_replica(cfg, db, replica)
    worker.stopping = stage.stopping
    log.info(
        "worker %d on %s",
        replica,
        "the CPU" if worker.device_index is None else f"GPU {worker.device_index}",
    )
    _ = worker.packages  # load the manifests up front: a broken package shows at start
    worker.release_orphans()
    try:
        worker.serve_forever()
    finally:
        db.dispose()
