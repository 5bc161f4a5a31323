"""Prometheus metrics read from the job table at scrape time.

Why a custom collector instead of counters incremented in code: each stage is its own
process (and may run on another host against PostgreSQL), so in-process counters
would need prometheus_client's multiprocess mode and would still miss other hosts.
The job table already records everything, so :class:`JobTableCollector` turns it
into metrics on each scrape (the inference histogram incrementally, see
:meth:`JobTableCollector._inference`).  Counters derived from row counts (``*_total``) drop if
rows are purged or an operator resets a job; Prometheus treats that as a counter
reset, which ``rate()`` handles.

Metric names (all prefixed ``airnode_``) are listed in ``docs/operations.md``.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from node.store.db import Database, Instance, Job, JobKind, JobStatus, Result, Study, StudyState

__all__ = [
    "INFERENCE_BUCKETS",
    "TIME_TO_RESULT_BUCKETS",
    "JobTableCollector",
    "render_metrics",
]

log = logging.getLogger("airnode.http.metrics")

#: Seconds; DX inference on a CPU is sub-second, a 300-slice CT tens of seconds.
INFERENCE_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
#: Seconds from the study's last received image to its last result acknowledged.
TIME_TO_RESULT_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_PHASE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_MAX_PHASES = 16  # timings keys are few and fixed; cap the label set anyway
_MAX_MODELS = 64
#: Seconds before the newest finish already read that the next scrape reads again.
WINDOW_MARGIN_S = 600.0
_PENDING = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED)


class _Hist:
    """Accumulates observations into cumulative Prometheus buckets."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.total += value
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for b, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            out.append((_le(b), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


def _le(b: float) -> str:
    return repr(float(b))


class JobTableCollector(Collector):
    """A prometheus_client collector that queries the job table on every scrape.

    ``data_dir`` enables the disk gauge; ``stage_status`` is a callable returning the
    supervisor's status document (see :func:`node.ops.supervisor.read_stage_status`).
    """

    def __init__(
        self,
        db: Database,
        *,
        data_dir: Path | None = None,
        stage_status: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        if not isinstance(db, Database):
            raise ValueError(f"db: expected a node.store.db.Database, got {type(db).__name__}")
        self.db = db
        self.data_dir = data_dir
        self.stage_status = stage_status
        self._lock = threading.Lock()
        self._inf: dict[tuple[str, str], _Hist] = {}
        self._models: set[str] = set()
        self._phases: set[str] = set()
        self._watermark = float("-inf")
        self._recent: dict[int, float] = {}

    def describe(self) -> Iterable[Metric]:
        return []  # the metric set is only known at scrape time; skip the registry's check

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect_db()
            up = 1.0
        except Exception as exc:  # a scrape must still answer (and say the DB is down)
            log.warning("metrics: database query failed: %s", type(exc).__name__)
            up = 0.0
        g = GaugeMetricFamily("airnode_database_up", "1 if the job table could be read.")
        g.add_metric([], up)
        yield g
        if self.data_dir is not None:
            try:
                free = float(shutil.disk_usage(self.data_dir).free)
            except OSError:
                free = float("nan")
            g = GaugeMetricFamily(
                "airnode_disk_free_bytes", "Free bytes on the file system of data_dir."
            )
            g.add_metric([], free)
            yield g
        if self.stage_status is not None:
            yield from self._stages()

    # -- pieces

    def _collect_db(self) -> Iterator[Metric]:
        t = time.time()
        with self.db.read() as s:
            n_inst, n_bytes = s.execute(
                select(func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0))
            ).one()
            studies = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)).all())
            jobs = s.execute(
                select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
            ).all()
            oldest = dict(
                s.execute(
                    select(Job.kind, func.min(Job.created_at))
                    .where(Job.status.in_((JobStatus.QUEUED, JobStatus.FAILED)))
                    .group_by(Job.kind)
                ).all()
            )
            results = dict(s.execute(select(Result.kind, func.count()).group_by(Result.kind)).all())
            inference = self._inference(s)
            send_attempts = s.execute(
                select(Job.status, func.coalesce(func.sum(Job.attempts), 0), func.count())
                .where(Job.kind == JobKind.SEND)
                .group_by(Job.status)
            ).all()
            ttr = self._time_to_result(s)

        c = CounterMetricFamily(
            "airnode_instances_received", "SOP instances received and stored (rows in instances)."
        )
        c.add_metric([], float(n_inst))
        yield c
        c = CounterMetricFamily(
            "airnode_instances_received_bytes", "Bytes of the SOP instances received and stored."
        )
        c.add_metric([], float(n_bytes))
        yield c

        g = GaugeMetricFamily("airnode_studies", "Studies by state.", labels=["state"])
        for st in StudyState:
            g.add_metric([st.value], float(studies.get(st, 0)))
        yield g

        g = GaugeMetricFamily("airnode_jobs", "Jobs by kind and status.", labels=["kind", "status"])
        counts = {(JobKind(k), JobStatus(st)): n for k, st, n in jobs}
        for k in JobKind:
            for st2 in JobStatus:
                g.add_metric([k.value, st2.value], float(counts.get((k, st2), 0)))
        yield g

        g = GaugeMetricFamily(
            "airnode_job_oldest_waiting_seconds",
            "Age of the oldest queued or failed (waiting to retry) job, by kind; 0 when none.",
            labels=["kind"],
        )
        for k in JobKind:
            created = oldest.get(k)
            g.add_metric([k.value], max(0.0, t - created) if created is not None else 0.0)
        yield g

        g = GaugeMetricFamily("airnode_results", "Result objects in the outbox.", labels=["kind"])
        for kind, n in sorted(results.items()):
            g.add_metric([str(kind)], float(n))
        yield g

        h = HistogramMetricFamily(
            "airnode_inference_seconds",
            "Duration of finished infer jobs by model and phase (load, preprocess, inference, "
            "encode, total...), from the timings the worker records.",
            labels=["model", "phase"],
        )
        for model, phase, buckets, total in inference:
            h.add_metric([model, phase], buckets, total)
        yield h

        failed_attempts = 0
        dead = 0
        for status, attempts, n in send_attempts:
            st3 = JobStatus(status)
            # The last attempt of a done job succeeded; a running one has not ended yet.
            ok_or_open = n if st3 in (JobStatus.DONE, JobStatus.RUNNING) else 0
            failed_attempts += max(0, int(attempts) - ok_or_open)
            if st3 == JobStatus.DEAD:
                dead = int(n)
        c = CounterMetricFamily(
            "airnode_send_failures",
            "Failed C-STORE attempts of send jobs (transient and permanent).",
        )
        c.add_metric([], float(failed_attempts))
        yield c
        g = GaugeMetricFamily(
            "airnode_send_dead_jobs", "Send jobs given up on (dead); they need an operator."
        )
        g.add_metric([], float(dead))
        yield g

        h = HistogramMetricFamily(
            "airnode_time_to_result_seconds",
            "Per study: last image received to last result acknowledged by a destination "
            "(includes the stable wait; studies with sends still pending are left out).",
        )
        h.add_metric([], ttr.buckets(), ttr.total)
        yield h

    def _inference(self, s: Any) -> list[tuple[str, str, list[tuple[str, float]], float]]:
        """Fold infer jobs finished since the last scrape into the histograms.

        Reading every finished job's payload on each scrape costs seconds past 10⁵
        jobs, so only jobs with ``finished_at`` at or after the watermark (minus a
        margin for commits that land late or clocks of other hosts) are read; the ids
        seen in that window are remembered so none is counted twice.  A job that is
        retried and finishes again is a new observation, as a counter should be.
        """
        with self._lock:
            query = select(Job.id, Job.finished_at).where(
                Job.kind == JobKind.INFER, Job.status == JobStatus.DONE
            )
            if self._watermark > float("-inf"):
                query = query.where(Job.finished_at >= self._watermark - WINDOW_MARGIN_S)
            fresh = {
                job_id: float(fin)
                for job_id, fin in s.execute(query)
                if fin is not None and self._recent.get(job_id) != fin
            }
            ids = sorted(fresh)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for job_id, payload in s.execute(
                    select(Job.id, Job.payload).where(Job.id.in_(chunk))
                ):
                    self._observe(payload)
                    self._recent[job_id] = fresh[job_id]
            if fresh:
                self._watermark = max(self._watermark, max(fresh.values()))
            floor = self._watermark - WINDOW_MARGIN_S
            self._recent = {k: v for k, v in self._recent.items() if v >= floor}
            return [
                (model, phase, hist.buckets(), hist.total)
                for (model, phase), hist in sorted(self._inf.items())
            ]

    def _observe(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        timings = payload.get("timings")
        if not isinstance(timings, dict):
            return
        model = payload.get("model")
        model = model if isinstance(model, str) and model else "unknown"
        if model not in self._models:
            if len(self._models) >= _MAX_MODELS:
                model = "other"
            self._models.add(model)
        for phase, value in timings.items():
            if not (isinstance(phase, str) and _PHASE_RE.match(phase)):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                continue
            if phase not in self._phases and len(self._phases) >= _MAX_PHASES:
                continue
            self._phases.add(phase)
            key = (model, phase)
            if key not in self._inf:
                self._inf[key] = _Hist(INFERENCE_BUCKETS)
            self._inf[key].observe(float(value))

    def _time_to_result(self, s: Any) -> _Hist:
        hist = _Hist(TIME_TO_RESULT_BUCKETS)
        pending = set(
            s.execute(
                select(Job.study_instance_uid)
                .where(Job.kind == JobKind.SEND, Job.status.in_(_PENDING))
                .distinct()
            ).scalars()
        )
        rows = s.execute(
            select(Job.study_instance_uid, func.max(Job.finished_at), Study.last_received_at)
            .join(Study, Study.study_instance_uid == Job.study_instance_uid)
            .where(Job.kind == JobKind.SEND, Job.status == JobStatus.DONE)
            .group_by(Job.study_instance_uid, Study.last_received_at)
        ).all()
        for uid, finished, received in rows:
            if uid in pending or finished is None or received is None:
                continue
            delta = float(finished) - float(received)
            if delta >= 0:  # negative: a new series arrived after the results went out
                hist.observe(delta)
        return hist

    def _stages(self) -> Iterator[Metric]:
        assert self.stage_status is not None
        status = self.stage_status()
        g = GaugeMetricFamily(
            "airnode_stage_up",
            "1 if the stage's process is running (from the supervisor).",
            labels=["stage"],
        )
        c = CounterMetricFamily(
            "airnode_stage_restarts",
            "Restarts of the stage since the supervisor started.",
            labels=["stage"],
        )
        stages = status.get("stages", {}) if isinstance(status, dict) else {}
        for name, info in sorted(stages.items()):
            if not isinstance(info, dict):
                continue
            g.add_metric([str(name)], 1.0 if info.get("state") == "running" else 0.0)
            c.add_metric([str(name)], float(info.get("restarts", 0) or 0))
        yield g
        yield c


def render_metrics(collector: JobTableCollector) -> bytes:
    """The Prometheus text exposition of ``collector`` alone (no process metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
