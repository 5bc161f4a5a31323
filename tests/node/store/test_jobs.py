"""The job layer: state machine, retry policy, claiming with leases, the reaper, races.

The claim tests run on SQLite and, where a server can be had (see ``tests/pg.py``), on
PostgreSQL, where claiming takes the ``FOR UPDATE SKIP LOCKED`` path.
"""

from __future__ import annotations

import multiprocessing as mp
import random
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select, update

from node.config import PRIORITY_LEVELS
from node.store import jobs
from node.store.db import TRANSITIONS, Database, Job, JobKind, JobStatus, init_db, now
from node.store.jobs import PermanentJobError, RetryPolicy, TransientJobError
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

Q, R, D, F, X = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.DONE,
    JobStatus.FAILED,
    JobStatus.DEAD,
)


def put(db: Database, key: str = "k", kind: JobKind = JobKind.INFER, **kw: object) -> int:
    job_id, created = jobs.enqueue(db, kind, key, {"key": key}, **kw)  # type: ignore[arg-type]
    assert created
    return job_id


def get(db: Database, job_id: int) -> Job:
    with db.read() as s:
        job = s.get(Job, job_id)
    assert job is not None
    return job


def force_status(db: Database, job_id: int, status: JobStatus, owner: str | None = None) -> None:
    with db.session() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=status,
                lease_owner=owner,
                lease_expires_at=now() + 60 if owner else None,
            )
        )


# -- the state machine -----------------------------------------------------------------


def test_transition_table_is_the_documented_one() -> None:
    assert {
        Q: {R, X},
        R: {D, F, X, Q},
        F: {R, Q, X},
        X: {Q},
        D: {Q},
    } == TRANSITIONS


@pytest.mark.parametrize("start", list(JobStatus))
def test_operator_retry_and_cancel_from_every_status(db: Database, start: JobStatus) -> None:
    job_id = put(db, "a")
    force_status(db, job_id, start)
    if start in (X, F, D):
        job = jobs.retry(db, job_id)
        assert job.status == Q and job.attempts == 0 and job.finished_at is None
    else:
        with pytest.raises(jobs.IllegalTransition, match=f"from {start} to queued"):
            jobs.retry(db, job_id)
        assert get(db, job_id).status == start

    other = put(db, "b")
    force_status(db, other, start)
    if start in (Q, F):
        job = jobs.cancel(db, other, "not wanted")
        assert job.status == X and job.last_error == "not wanted" and job.finished_at
    else:
        with pytest.raises(jobs.IllegalTransition):
            jobs.cancel(db, other)
        assert get(db, other).status == start


@pytest.mark.parametrize("start", [Q, D, F, X])
def test_only_a_running_job_can_be_completed_or_failed(db: Database, start: JobStatus) -> None:
    job_id = put(db)
    force_status(db, job_id, start, owner="w1")
    assert jobs.complete(db, job_id, "w1") is False
    job = get(db, job_id)
    assert jobs.fail(db, job, "w1", TransientJobError("x"), RetryPolicy()) is None
    assert get(db, job_id).status == start


def test_complete_by_the_owner(db: Database) -> None:
    job_id = put(db)
    job = jobs.claim(db, JobKind.INFER, "w1")
    assert job is not None and job.id == job_id
    assert jobs.complete(db, job_id, "w2") is False  # not the lease holder
    assert jobs.complete(db, job_id, "w1", payload={"out": 1}) is True
    done = get(db, job_id)
    assert done.status == D and done.payload == {"out": 1} and done.finished_at is not None
    assert done.lease_owner is None and done.lease_expires_at is None
    assert jobs.complete(db, job_id, "w1") is False  # twice: no


def test_unknown_job_ids_raise(db: Database) -> None:
    for op in (jobs.retry, jobs.cancel):
        with pytest.raises(KeyError, match="no job 999"):
            op(db, 999)
    with pytest.raises(KeyError):
        jobs.complete(db, 999, "w")


# -- retry policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"base_delay_s": 0}, "base_delay_s"),
        ({"base_delay_s": 10, "max_delay_s": 5}, "max_delay_s"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.5}, "jitter"),
    ],
)
def test_retry_policy_refuses_bad_values(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retry_delay_doubles_and_is_capped_without_jitter() -> None:
    p = RetryPolicy(base_delay_s=2, max_delay_s=60, jitter=0.0)
    assert [p.delay(a) for a in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert p.delay(0) == 2 and p.delay(1000) == 60  # no overflow on huge attempt numbers


def test_retry_jitter_stays_in_its_range_and_uses_it() -> None:
    p = RetryPolicy(base_delay_s=1, max_delay_s=100, jitter=0.5)
    rng = random.Random(7)
    for attempt in (1, 3, 6, 20):
        raw = min(100.0, 2.0 ** (attempt - 1))
        samples = [p.delay(attempt, rng) for _ in range(400)]
        assert all(raw * 0.5 <= d <= raw for d in samples)
        # Spread over the range, not a constant.
        assert min(samples) < raw * 0.55 and max(samples) > raw * 0.95


def test_transient_failure_backs_off_then_gives_up(db: Database) -> None:
    job_id = put(db, max_attempts=2)
    policy = RetryPolicy(base_delay_s=30, max_delay_s=30, jitter=0.0)
    job = jobs.claim(db, JobKind.INFER, "w")
    assert job is not None
    before = now()
    assert jobs.fail(db, job, "w", TransientJobError("association aborted"), policy) == F
    failed = get(db, job_id)
    assert failed.not_before >= before + 30
    assert "association aborted" in (failed.last_error or "")
    assert jobs.claim(db, JobKind.INFER, "w") is None  # backing off
    force_due(db, job_id)
    job = jobs.claim(db, JobKind.INFER, "w")
    assert job is not None and job.attempts == 2
    assert jobs.fail(db, job, "w", TransientJobError("again"), policy) == X
    dead = get(db, job_id)
    assert dead.status == X and (dead.last_error or "").startswith("gave up after 2 attempts")


def test_permanent_failure_is_dead_at_once(db: Database) -> None:
    job_id = put(db)
    job = jobs.claim(db, JobKind.INFER, "w")
    assert job is not None
    status = jobs.fail(db, job, "w", PermanentJobError("0xA900 identifier mismatch"), RetryPolicy())
    assert status == X
    dead = get(db, job_id)
    assert dead.attempts == 1 and "0xA900" in (dead.last_error or "")
    # Any exception that does not say "transient" is permanent.
    other = put(db, "b")
    job = jobs.claim(db, JobKind.INFER, "w")
    assert job is not None and job.id == other
    assert jobs.fail(db, job, "w", ValueError("bad input"), RetryPolicy()) == X


def force_due(db: Database, job_id: int) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(not_before=0.0))


# -- claiming, leases, reaper (SQLite and PostgreSQL) ----------------------------------


def test_enqueue_is_idempotent(anydb: Database) -> None:
    first = jobs.enqueue(anydb, JobKind.SEND, "send:1.2.3:pacs", {"n": 1})
    again = jobs.enqueue(anydb, JobKind.SEND, "send:1.2.3:pacs", {"n": 2})
    assert first[1] is True and again == (first[0], False)
    assert get(anydb, first[0]).payload == {"n": 1}


def test_enqueue_in_rolls_back_with_its_transaction(anydb: Database) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), anydb.session() as s:
        jobs.enqueue_in(s, JobKind.INFER, "k", {})
        raise Boom
    assert jobs.enqueue(anydb, JobKind.INFER, "k", {})[1] is True


def test_claim_order_kind_and_due_time(anydb: Database) -> None:
    later = put(anydb, "later", not_before=now() + 3600)
    a = put(anydb, "a")
    b = put(anydb, "b")
    s = put(anydb, "s", kind=JobKind.SEND)
    first = jobs.claim(anydb, JobKind.INFER, "w", lease_s=60)
    second = jobs.claim(anydb, JobKind.INFER, "w", lease_s=60)
    assert first is not None and second is not None
    assert [first.id, second.id] == [a, b]
    assert first.status == R and first.attempts == 1 and first.lease_owner == "w"
    assert first.lease_expires_at is not None and first.lease_expires_at > now() + 50
    assert jobs.claim(anydb, JobKind.INFER, "w") is None  # only `later` is left, not due
    sent = jobs.claim(anydb, JobKind.SEND, "w")
    assert sent is not None and sent.id == s
    assert get(anydb, later).status == Q


def test_a_stat_job_overtakes_50_routine_ones(anydb: Database) -> None:
    routine = [
        put(anydb, f"ct-{i}", priority=PRIORITY_LEVELS["routine"], study_instance_uid=f"1.2.{i}")
        for i in range(50)
    ]
    stat = put(anydb, "dx-stat", priority=PRIORITY_LEVELS["stat"], study_instance_uid="1.3")
    first = jobs.claim(anydb, JobKind.INFER, "w")
    assert first is not None and first.id == stat and first.priority == PRIORITY_LEVELS["stat"]
    # Then the routine ones, oldest first.
    rest = [jobs.claim(anydb, JobKind.INFER, "w") for _ in range(3)]
    assert [j.id for j in rest if j is not None] == routine[:3]


def test_claim_order_is_priority_then_due_time_then_age(anydb: Database) -> None:
    research = put(anydb, "research", priority=PRIORITY_LEVELS["research"])
    routine_retry = put(anydb, "routine-retry", not_before=now() - 10)
    routine_new = put(anydb, "routine-new")
    urgent_later = put(anydb, "urgent-later", priority=200, not_before=now() + 3600)
    urgent = put(anydb, "urgent", priority=200)
    default = get(anydb, routine_new)
    assert default.priority == PRIORITY_LEVELS["routine"]  # the default
    order = []
    while (job := jobs.claim(anydb, JobKind.INFER, "w")) is not None:
        order.append(job.id)
    # The urgent job that is not due yet waits; among equals the earliest due goes first.
    assert order == [urgent, routine_new, routine_retry, research]
    assert get(anydb, urgent_later).status == Q


def test_claim_with_extra_condition(anydb: Database) -> None:
    put(anydb, "a")
    b = put(anydb, "b")
    job = jobs.claim(anydb, JobKind.INFER, "w", extra_where=[Job.idempotency_key == "b"])
    assert job is not None and job.id == b


def test_heartbeat_extends_only_the_owners_lease(anydb: Database) -> None:
    put(anydb)
    job = jobs.claim(anydb, JobKind.INFER, "w1", lease_s=5)
    assert job is not None and job.lease_expires_at is not None
    assert jobs.heartbeat(anydb, job.id, "w2", lease_s=500) is False
    assert jobs.heartbeat(anydb, job.id, "w1", lease_s=500) is True
    expires = get(anydb, job.id).lease_expires_at
    assert expires is not None and expires > job.lease_expires_at + 400


def test_reaper_requeues_expired_leases_and_the_old_owner_loses(anydb: Database) -> None:
    put(anydb, "a", max_attempts=3)
    put(anydb, "b")
    stale = jobs.claim(anydb, JobKind.INFER, "dead-worker", lease_s=-1)  # already expired
    alive = jobs.claim(anydb, JobKind.INFER, "live-worker", lease_s=600)
    assert stale is not None and alive is not None
    assert jobs.reap_expired(anydb) == 1
    reaped = get(anydb, stale.id)
    assert reaped.status == F and reaped.lease_owner is None
    assert "dead-worker" in (reaped.last_error or "")
    assert get(anydb, alive.id).status == R
    # The dead worker wakes up: its results no longer count, nor its heartbeats.
    assert jobs.complete(anydb, stale.id, "dead-worker") is False
    assert jobs.heartbeat(anydb, stale.id, "dead-worker") is False
    again = jobs.claim(anydb, JobKind.INFER, "new-worker")
    assert again is not None and again.id == stale.id and again.attempts == 2
    assert jobs.complete(anydb, stale.id, "new-worker") is True


def test_reaper_kills_a_job_that_keeps_killing_its_worker(anydb: Database) -> None:
    job_id = put(anydb, max_attempts=2)
    for _ in range(2):
        force_due(anydb, job_id)
        assert jobs.claim(anydb, JobKind.INFER, "w", lease_s=-1) is not None
        jobs.reap_expired(anydb)
    job = get(anydb, job_id)
    assert job.status == X and (job.last_error or "").startswith("gave up after 2 attempts")
    assert job.finished_at is not None


def test_counts(anydb: Database) -> None:
    put(anydb, "a")
    put(anydb, "b")
    put(anydb, "c", kind=JobKind.SEND)
    assert jobs.claim(anydb, JobKind.INFER, "w") is not None
    assert jobs.counts(anydb) == {("infer", "running"): 1, ("infer", "queued"): 1,
                                  ("send", "queued"): 1}  # fmt: skip


# -- races between processes ------------------------------------------------------------

N_JOBS = 1000
N_PROCS = 4


def _claim_loop(url: str, out: str, ready: mp.synchronize.Barrier) -> None:
    """A worker process: claim until the queue is empty, log each job it finished."""
    db = Database(url)
    owner = f"proc-{mp.current_process().name}"
    ready.wait(timeout=60)
    with open(out, "w", encoding="ascii") as log:
        while True:
            job = jobs.claim(db, JobKind.INFER, owner, lease_s=300)
            if job is None:
                break
            if jobs.complete(db, job.id, owner):
                log.write(f"{job.id}\n")
    db.dispose()


def _enqueue_loop(url: str, out: str, ready: mp.synchronize.Barrier) -> None:
    db = Database(url)
    ready.wait(timeout=60)
    with open(out, "w", encoding="ascii") as log:
        for i in range(100):
            job_id, created = jobs.enqueue(db, JobKind.SEND, f"send:{i}", {"i": i})
            log.write(f"{i} {job_id} {int(created)}\n")
    db.dispose()


def _run_procs(target: object, url: str, tmp_path: Path) -> list[Path]:
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(N_PROCS)
    outs = [tmp_path / f"out-{i}.txt" for i in range(N_PROCS)]
    procs = [
        ctx.Process(target=target, args=(url, str(o), ready), name=str(i))  # type: ignore[arg-type]
        for i, o in enumerate(outs)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=240)
        assert [p.exitcode for p in procs] == [0] * N_PROCS
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return outs


@pytest.mark.slow
def test_processes_racing_for_1000_jobs_do_each_exactly_once(
    anydb: Database, tmp_path: Path
) -> None:
    with anydb.session() as s:
        t = now()
        s.add_all(
            Job(
                kind=JobKind.INFER,
                status=Q,
                idempotency_key=f"k{i}",
                payload={},
                attempts=0,
                max_attempts=10,
                not_before=0.0,
                created_at=t,
                updated_at=t,
            )
            for i in range(N_JOBS)
        )
    outs = _run_procs(_claim_loop, anydb.url, tmp_path)
    done_by = [Counter(int(x) for x in o.read_text().split()) for o in outs]
    total = sum(done_by, Counter())
    with anydb.read() as s:
        ids = set(s.scalars(select(Job.id)))
        rows = s.execute(select(Job.status, Job.attempts)).all()
    assert set(total) == ids and len(ids) == N_JOBS
    assert max(total.values()) == 1  # nobody did a job twice
    assert all(st == D and att == 1 for st, att in rows)  # each claimed exactly once
    assert sum(1 for c in done_by if c) >= 2  # the processes really did share the work


def test_processes_racing_to_enqueue_the_same_keys_make_one_job_each(
    anydb: Database, tmp_path: Path
) -> None:
    outs = _run_procs(_enqueue_loop, anydb.url, tmp_path)
    seen: dict[int, set[int]] = {}
    created: Counter[int] = Counter()
    for o in outs:
        for line in o.read_text().splitlines():
            i, job_id, new = (int(x) for x in line.split())
            seen.setdefault(i, set()).add(job_id)
            created[i] += new
    assert all(len(v) == 1 for v in seen.values())  # every process got the same id
    assert set(created.values()) == {1}  # exactly one process created each job
    with anydb.read() as s:
        assert len(s.scalars(select(Job.id)).all()) == 100


# ------------------------------------------- the retry policy belongs to the job kind


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("reaper", ["scheduler", "worker"])
def test_a_crashed_job_gets_its_own_kinds_attempts_whoever_reaps(
    tmp_path: Path, reaper: str
) -> None:
    """An infer job and a send job crash their process again and again; each ends dead
    after the attempts of its own kind, whichever process's reaper returns them."""
    import socket

    from node.config import NodeConfig
    from node.work.worker import Worker

    cfg = NodeConfig.model_validate(
        {"node": {"data_dir": str(tmp_path / "data")}, "send": {"max_attempts": 4}}
    )
    db = init_db(cfg.node.resolved_database_url)
    # Enqueued the way the scheduler and the outbox enqueue them.
    infer_id, _ = jobs.enqueue(db, JobKind.INFER, "infer:1", {"model": "m"})
    send_id, _ = jobs.enqueue(
        db, JobKind.SEND, "send:1:pacs", {"destination": "pacs"}, max_attempts=4
    )
    dead_owner = f"worker:{socket.gethostname()}:{_dead_pid()}"
    claims: Counter[JobKind] = Counter()
    for _ in range(12):
        for kind, owner in ((JobKind.INFER, dead_owner), (JobKind.SEND, "sender:gone/pacs")):
            if jobs.claim(db, kind, owner, lease_s=600) is not None:
                claims[kind] += 1
        with db.session() as s:  # both processes died and their leases ran out
            s.execute(update(Job).where(Job.status == R).values(lease_expires_at=now() - 1))
        if reaper == "scheduler":
            jobs.reap_expired(db)
        else:
            Worker(cfg, db).release_orphans()
    assert claims == {JobKind.INFER: 3, JobKind.SEND: 4}
    for job_id, n in ((infer_id, 3), (send_id, 4)):
        job = get(db, job_id)
        assert job.status == X and (job.last_error or "").startswith(f"gave up after {n}")
    db.dispose()
