"""The scheduler: decides when a study is complete and queues its inference jobs.

DICOM has no "end of study" message (a C-STORE association may close after any
instance, PS3.7 Section 9.1.1).  Exact signals come first, when there is one:

* ``retrieve``: a C-MOVE/C-GET the node started ended with every sub-operation done
  (``airnode fetch`` sets ``studies.complete_at``);
* ``mpps``: the study's Modality Performed Procedure Steps (PS3.4 Annex F.7) are all
  COMPLETED (or DISCONTINUED) and every instance they list has arrived;
* ``count``: exactly as many instances arrived as the newest one states in Number of
  Study Related Instances (0020,1208).

An exact signal holds only while no instance arrived after it; otherwise a study
counts as complete when no instance arrived for ``study.stable_after_s``, like
Orthanc's StableAge (``stable``); a study that keeps trickling in is taken anyway
``study.force_after_s`` after its first instance (``forced``).  The rule that fired
is kept in ``studies.complete_rule``.

For a complete study the scheduler reads one header per series, evaluates the routing
rules (:mod:`node.schedule.routing`) and creates one ``infer`` job per (study, model name,
model version).  The job's idempotency key also holds a digest of its input (the
sorted SOP Instance UIDs of the series the model's rules matched), so:

* ticking again, or a restarted scheduler, never creates a second job;
* a series that arrives after the study was scheduled starts a new run of only the
  models whose input changed; the others keep their existing job.

A study no rule matches becomes ``unrouted``, with no job.  The scheduler also runs
the lease reaper (:func:`node.store.jobs.reap_expired`) every few seconds, and with
``[retention] enabled`` the retention pass (:class:`node.store.retention.Retention`).
A job's priority is the highest of its routes' ``priority`` and what the
``[priority]`` attributes of its input series ask for (:mod:`node.schedule.priority`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from models.package import ModelPackage, discover_packages, select_package
from node.config import NodeConfig
from node.errors import UserError
from node.logs import uid_tag
from node.runtime import start_stage
from node.schedule.priority import HeaderPriority, route_priority
from node.schedule.routing import RouteMatch, Router, RoutingError, read_header
from node.store import jobs
from node.store.db import CompleteRule, Database, Instance, JobKind, Mpps, Study, StudyState
from node.store.payloads import InferPayload
from node.store.retention import Retention

__all__ = [
    "ModelVersionError",
    "TickReport",
    "infer_key",
    "installed_packages",
    "run",
    "tick",
]

log = logging.getLogger(__name__)

#: How many files of a series are tried before routing it on the table's columns only.
_HEADER_TRIES = 3
_NOTE_MAX = 2000


class ModelVersionError(LookupError):
    """A route names a model that no package in ``inference.model_dirs`` provides."""


#: Model name → version → package (:func:`models.package.discover_packages`).
Installed = dict[str, dict[str, ModelPackage]]


@dataclass
class TickReport:
    """What one scheduling pass did (for logs, metrics and tests)."""

    due: int = 0
    scheduled: list[str] = field(default_factory=list)
    unrouted: list[str] = field(default_factory=list)
    jobs_created: list[int] = field(default_factory=list)
    jobs_existing: list[int] = field(default_factory=list)
    skipped_changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reaped: int = 0


def installed_packages(model_dirs: Sequence[Path]) -> Installed:
    """Model name → version → package under ``model_dirs``, as the worker sees them."""
    return discover_packages(model_dirs)


def infer_key(study_uid: str, model: str, version: str, sop_uids: Iterable[str]) -> str:
    """Idempotency key of an ``infer`` job: study + model + version + input digest."""
    digest = jobs.key_digest(*sorted(sop_uids))
    key = f"infer:{study_uid}:{model}@{version}:{digest}"
    if len(key) > 255:  # the column's size; long model names are hashed in
        key = f"infer:{study_uid}:{jobs.key_digest(model, version, digest)}"
    return key


@dataclass
class _Series:
    uid: str
    rows: list[Instance]


_EXACT = frozenset({CompleteRule.RETRIEVE, CompleteRule.MPPS, CompleteRule.COUNT})
_MPPS_DONE = ("COMPLETED", "DISCONTINUED")


def _exact_rule(st: Study) -> CompleteRule | None:
    """The exact signal recorded on the study, if no instance arrived after it."""
    if st.complete_at is None or st.complete_at < st.last_received_at:
        return None
    rule = st.complete_rule
    return CompleteRule(rule) if rule in _EXACT else CompleteRule.RETRIEVE


def _mpps_complete(s: Session, st: Study) -> bool:
    """Every MPPS of the study is finished and every instance they list is here.

    Each N-SET that finishes a step may complete the study once: a study completed
    after the newest step changed falls back to the time rules for later instances.
    """
    steps = s.scalars(select(Mpps).where(Mpps.study_instance_uid == st.study_instance_uid)).all()
    if not steps or any(m.status not in _MPPS_DONE for m in steps):
        return False
    if st.complete_at is not None and st.complete_at >= max(m.updated_at for m in steps):
        return False
    listed = {uid for m in steps for uid in m.referenced}
    if not listed:
        return False
    present = s.scalar(
        select(func.count(Instance.id)).where(
            Instance.study_instance_uid == st.study_instance_uid,
            Instance.sop_instance_uid.in_(listed),
        )
    )
    return present == len(listed)


def _due_studies(
    db: Database, t: float, stable_s: float, force_s: float
) -> list[tuple[Study, CompleteRule]]:
    """Studies complete by an exact signal, quiet, or past the ceiling, with the rule.

    Candidates are ``receiving`` studies, and ``scheduled``/``unrouted`` ones that
    received instances after they were scheduled (a late series, whether or not the
    receiver put the study back to ``receiving``).  The force ceiling counts from the
    first instance of the current burst: for a study scheduled before, the first
    instance that arrived after that, not the study's very first one.
    """
    with db.read() as s:
        finished_mpps = select(Mpps.study_instance_uid).where(Mpps.status.in_(_MPPS_DONE))
        candidates = s.scalars(
            select(Study).where(
                or_(
                    and_(
                        Study.state == StudyState.RECEIVING,
                        or_(
                            Study.last_received_at <= t - stable_s,
                            Study.first_received_at <= t - force_s,
                            Study.complete_at >= Study.last_received_at,
                            Study.study_instance_uid.in_(finished_mpps),
                            Study.instance_count == Study.expected_instances,
                        ),
                    ),
                    and_(
                        Study.state.in_((StudyState.SCHEDULED, StudyState.UNROUTED)),
                        Study.scheduled_at.is_not(None),
                        Study.last_received_at > Study.scheduled_at,
                    ),
                )
            )
        ).all()
        due: list[tuple[Study, CompleteRule]] = []
        for st in candidates:
            exact = _exact_rule(st)
            if exact is None and _mpps_complete(s, st):
                exact = CompleteRule.MPPS
            if exact is None and st.instance_count == st.expected_instances:
                exact = CompleteRule.COUNT
            if exact is not None:
                due.append((st, exact))
                continue
            if st.last_received_at <= t - stable_s:
                due.append((st, CompleteRule.STABLE))
                continue
            burst_start = st.first_received_at
            if st.scheduled_at is not None:
                burst_start = s.scalar(
                    select(func.min(Instance.received_at)).where(
                        Instance.study_instance_uid == st.study_instance_uid,
                        Instance.received_at > st.scheduled_at,
                    )
                ) or max(st.scheduled_at, st.first_received_at)
            if burst_start <= t - force_s:
                due.append((st, CompleteRule.FORCED))
    return due


def _series_of(db: Database, study_uid: str) -> list[_Series]:
    with db.read() as s:
        rows = s.scalars(
            select(Instance)
            .where(Instance.study_instance_uid == study_uid)
            .order_by(Instance.series_instance_uid, Instance.received_at, Instance.id)
        ).all()
    by_series: dict[str, list[Instance]] = defaultdict(list)
    for row in rows:
        by_series[row.series_instance_uid].append(row)
    return [_Series(uid, insts) for uid, insts in by_series.items()]


def _route_series(
    router: Router, spool: Path, series: _Series, header_priority: HeaderPriority
) -> tuple[list[RouteMatch], int | None]:
    """The routes that fire for the series, and the priority its header asks for."""
    first = series.rows[0]
    defaults = {"Modality": first.modality, "SOPClassUID": first.sop_class_uid}
    ds = None
    for row in series.rows[:_HEADER_TRIES]:
        try:
            ds = read_header(spool / row.path)
            break
        except Exception as exc:  # unreadable file: try another one of the series
            log.warning(
                "series %s: header of %s unreadable (%s)",
                uid_tag(series.uid),
                uid_tag(row.sop_instance_uid),
                type(exc).__name__,
            )
    attrs = router.attributes(ds, calling_ae=first.calling_ae, defaults=defaults)
    return router.evaluate(attrs), header_priority.of(ds)


def _finish_study(
    db: Database,
    study: Study,
    state: StudyState,
    note: Callable[[list[tuple[int, bool]]], str],
    t: float,
    rule: CompleteRule,
    new_jobs: Sequence[tuple[str, InferPayload, int]] = (),
) -> tuple[bool, list[tuple[int, bool]]]:
    """Record the outcome and queue the jobs in one transaction.

    If an instance arrived since the study was read, a quiet study is left alone (it
    is not quiet any more; it comes back later with the new instance in its input).
    A forced study is finished anyway, with ``scheduled_at`` set to the newest
    instance the pass saw, so the newer ones count as a late arrival and are taken
    on a later pass: a study that never stops trickling still gets its jobs.
    ``rule`` is recorded in ``complete_rule``; an MPPS or count completion also
    sets ``complete_at`` (a retrieve sets it itself).
    """
    forced = rule == CompleteRule.FORCED
    with db.session() as s:
        current = s.get(Study, study.id, with_for_update=True)
        if current is None:
            return False, []
        unchanged = (
            current.last_received_at == study.last_received_at
            and current.instance_count == study.instance_count
        )
        if not unchanged and not forced:
            return False, []
        queued = [
            jobs.enqueue_in(
                s,
                JobKind.INFER,
                key,
                payload,
                study_instance_uid=study.study_instance_uid,
                priority=prio,
            )
            for key, payload, prio in new_jobs
        ]
        current.state = state
        current.scheduled_at = t if unchanged else study.last_received_at
        current.note = note(queued)[:_NOTE_MAX]
        current.complete_rule = rule.value
        if rule in (CompleteRule.MPPS, CompleteRule.COUNT):
            current.complete_at = t
        return True, queued


def _schedule_study(
    db: Database,
    cfg: NodeConfig,
    router: Router,
    installed: Installed | None,
    study: Study,
    rule: CompleteRule,
    t: float,
    report: TickReport,
) -> Installed | None:
    uid = study.study_instance_uid
    series = _series_of(db, uid)
    # (model, pinned version) → series UIDs, SOP UIDs, destinations, route names
    wanted: dict[
        tuple[str, str | None], tuple[set[str], set[str], dict[str, None], dict[str, None]]
    ] = {}
    asked: dict[tuple[str, str | None], int] = {}  # the highest priority a header asked for
    header_priority = HeaderPriority(cfg.priority)
    for ser in series:
        matches, ser_prio = _route_series(router, cfg.node.spool_dir, ser, header_priority)
        for m in matches:
            ser_uids, sops, dests, routes = wanted.setdefault(
                (m.model, m.model_version), (set(), set(), {}, {})
            )
            if ser_prio is not None:
                asked[m.model, m.model_version] = max(
                    ser_prio, asked.get((m.model, m.model_version), ser_prio)
                )
            ser_uids.add(ser.uid)
            sops.update(r.sop_instance_uid for r in ser.rows)
            dests.update(dict.fromkeys(m.destinations))
            routes[m.route] = None
    if not wanted:
        note = f"no route matched its {len(series)} series" if series else "no instances"
        done, _ = _finish_study(db, study, StudyState.UNROUTED, lambda _: note, t, rule)
        if done:
            report.unrouted.append(uid)
            log.info("study %s unrouted: %s", uid_tag(uid), note)
        else:
            report.skipped_changed.append(uid)
        return installed

    if installed is None:
        installed = installed_packages(cfg.inference.model_dirs)
    notes: list[str] = []
    new_jobs: list[tuple[str, InferPayload, int]] = []
    labels: list[str] = []
    for (model, pin), (ser_uids, sops, dests, routes) in wanted.items():
        pkg = select_package(installed.get(model, {}), pin)
        if pkg is None:
            what = f"model {model!r}" if pin is None else f"model {model!r} version {pin!r}"
            msg = (
                f"route {', '.join(routes)}: unknown {what} "
                f"(no package in {', '.join(str(d) for d in cfg.inference.model_dirs)})"
            )
            log.error("study %s: %s", uid_tag(uid), msg)
            report.errors.append(msg)
            notes.append(msg)
            continue
        version = pkg.version
        # Configuration order, not series order, so the payload is deterministic.
        fired = [r.name for r in router.routes if r.name in routes]
        dests = dict.fromkeys(d for r in router.routes if r.name in routes for d in r.send_to)
        payload = InferPayload(
            model=model,
            model_version=version,
            study_instance_uid=uid,
            series_instance_uids=sorted(ser_uids),
            sop_instance_uids=sorted(sops),
            destinations=list(dests),
            route=fired[0],
            routes=fired,
        )
        prio = route_priority(r for r in router.routes if r.name in routes)
        prio = max(prio, asked.get((model, pin), prio))  # a header only raises it
        new_jobs.append((infer_key(uid, model, version, sops), payload, prio))
        labels.append(f"{model}@{version} ({len(ser_uids)} series, {len(sops)} instances)")
    if not new_jobs:
        # Every matching model is unknown: nothing can run; the note says why.
        done, _ = _finish_study(db, study, StudyState.UNROUTED, lambda _: "; ".join(notes), t, rule)
        (report.unrouted if done else report.skipped_changed).append(uid)
        return installed

    def note_for(queued: list[tuple[int, bool]]) -> str:
        parts = [
            f"{label}: job {job_id}{'' if created else ' (input unchanged)'}"
            for label, (job_id, created) in zip(labels, queued, strict=True)
        ]
        return "; ".join(parts + notes)

    done, queued = _finish_study(db, study, StudyState.SCHEDULED, note_for, t, rule, new_jobs)
    if not done:
        report.skipped_changed.append(uid)
        return installed
    report.scheduled.append(uid)
    for label, (job_id, created) in zip(labels, queued, strict=True):
        (report.jobs_created if created else report.jobs_existing).append(job_id)
        if created:
            log.info("study %s: queued job %s, %s", uid_tag(uid), job_id, label)
    return installed


def tick(
    db: Database,
    cfg: NodeConfig,
    now: float | None = None,
    *,
    router: Router | None = None,
) -> TickReport:
    """One scheduling pass over the studies that are due at ``now``.

    Safe to run from several processes at once and to repeat: jobs are created
    through their idempotency key and a study's state is only written if no
    instance arrived since it was read (else it is taken again on a later pass).
    """
    t = time.time() if now is None else now
    router = router or Router(cfg.routes)
    report = TickReport()
    due = _due_studies(db, t, cfg.study.stable_after_s, cfg.study.force_after_s)
    report.due = len(due)
    installed: Installed | None = None  # read lazily, once per pass
    for study, rule in due:
        try:
            installed = _schedule_study(db, cfg, router, installed, study, rule, t, report)
        except Exception as exc:  # one broken study must not stop the others
            msg = f"study {uid_tag(study.study_instance_uid)}: {type(exc).__name__}: {exc}"
            log.exception("scheduling failed: %s", msg)
            report.errors.append(msg)
    return report


def run(
    cfg: NodeConfig, replica: int = 0, *, poll_s: float = 0.5, reap_every_s: float = 5.0
) -> None:
    """Entry point of ``airnode schedule``: tick until SIGTERM or Ctrl-C."""
    stage = start_stage(cfg, "scheduler", replica)
    try:  # a bad rule stops here, before any study is touched
        router = Router(cfg.routes)
    except RoutingError as exc:
        raise UserError(f"config error: {exc}") from None
    db = stage.open_db()
    stopping = stage.stopping
    known = installed_packages(cfg.inference.model_dirs)
    for route in router.routes:
        if select_package(known.get(route.model, {}), route.model_version) is None:
            log.error(
                "route %s names model %r%s, which no package in model_dirs provides",
                route.name,
                route.model,
                f" version {route.model_version!r}" if route.model_version else "",
            )
    log.info(
        "scheduler: %d route(s), stable after %.0f s, forced after %.0f s",
        len(router.routes),
        cfg.study.stable_after_s,
        cfg.study.force_after_s,
    )
    next_reap = 0.0
    keeper = Retention(db, cfg) if cfg.retention.enabled else None
    try:
        while not stopping.is_set():
            try:
                if keeper is not None:  # [retention]: by age, watermarks, emergency floor
                    keeper.tick()
                if time.monotonic() >= next_reap:
                    reaped = jobs.reap_expired(db)
                    if reaped:
                        log.warning("reaper: %d job(s) with an expired lease requeued", reaped)
                    next_reap = time.monotonic() + reap_every_s
                report = tick(db, cfg, router=router)
                if report.errors:
                    log.error("tick: %d error(s)", len(report.errors))
            except Exception:  # database briefly unavailable: log, wait, go on
                log.exception("scheduler pass failed")
            stopping.wait(poll_s)
    finally:
        db.dispose()
