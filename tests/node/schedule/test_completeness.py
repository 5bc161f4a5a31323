"""Which rule completes a study: exact signals (retrieve, MPPS, count) before time rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from node.config import NodeConfig
from node.schedule.scheduler import tick
from node.store.db import CompleteRule, Database, Mpps, Study, StudyState, init_db
from node.store.studies import mark_complete
from tests.node.schedule.test_scheduler import (
    FORCE,
    STABLE,
    T0,
    Feed,
    infer_jobs,
    make_cfg,
    study_row,
)
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)


@pytest.fixture
def cfg(tmp_path: Path) -> NodeConfig:
    return make_cfg(tmp_path)


@pytest.fixture
def feed(db: Database, cfg: NodeConfig) -> Feed:
    return Feed(db, cfg)


def add_mpps(db: Database, study: str, status: str, listed: list[str], at: float) -> None:
    with db.session() as s:
        s.add(
            Mpps(
                sop_instance_uid=generate_uid(),
                study_instance_uid=study,
                status=status,
                referenced=listed,
                calling_ae="CT1",
                created_at=at,
                updated_at=at,
            )
        )


def test_retrieved_study_is_due_at_once(db: Database, cfg: NodeConfig, feed: Feed) -> None:
    study = generate_uid()
    feed.series(study, 3, T0)
    assert mark_complete(db, study, CompleteRule.RETRIEVE, at=T0 + 1)
    report = tick(db, cfg, now=T0 + 2)  # far inside stable_after_s
    assert report.scheduled == [study] and len(infer_jobs(db)) == 1
    row = study_row(db, study)
    assert row.state == StudyState.SCHEDULED and row.complete_rule == "retrieve"


def test_instance_after_the_retrieve_falls_back_to_the_quiet_rule(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    study = generate_uid()
    series, _ = feed.series(study, 2, T0)
    mark_complete(db, study, CompleteRule.RETRIEVE, at=T0 + 1)
    feed.add(study, series, T0 + 2)  # later than the signal: it no longer holds
    assert tick(db, cfg, now=T0 + 3).due == 0
    assert tick(db, cfg, now=T0 + 2 + STABLE + 1).scheduled == [study]
    assert study_row(db, study).complete_rule == "stable"


def test_unknown_study_cannot_be_marked(db: Database) -> None:
    assert not mark_complete(db, generate_uid(), CompleteRule.RETRIEVE)


def test_time_rules_are_recorded(db: Database, cfg: NodeConfig, feed: Feed) -> None:
    quiet, trickling = generate_uid(), generate_uid()
    feed.series(quiet, 1, T0)
    series = generate_uid()
    t = T0
    while t < T0 + FORCE + 30:  # one instance every 30 s: never quiet
        feed.add(trickling, series, t)
        tick(db, cfg, now=t + 1)
        t += 30
    assert study_row(db, quiet).complete_rule == "stable"
    assert study_row(db, trickling).complete_rule == "forced"


def test_mpps_completes_the_study_when_the_last_listed_instance_arrives(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    study = generate_uid()
    series = generate_uid()
    first = [feed.add(study, series, T0), feed.add(study, series, T0 + 1)]
    missing = generate_uid()
    add_mpps(db, study, "COMPLETED", [*first, missing], at=T0 + 2)
    assert tick(db, cfg, now=T0 + 3).due == 0  # one listed instance is missing
    # The last one arrives (Feed makes its own UIDs: list that one instead of `missing`).
    arrived = feed.add(study, series, T0 + 4)
    with db.session() as s:
        s.query(Mpps).filter_by(study_instance_uid=study).one().referenced = [*first, arrived]
    report = tick(db, cfg, now=T0 + 5)
    assert report.scheduled == [study]
    row = study_row(db, study)
    assert row.complete_rule == "mpps" and row.complete_at == T0 + 5
    # A later instance does not complete it again at once: back to the quiet rule.
    feed.add(study, series, T0 + 6)
    assert tick(db, cfg, now=T0 + 7).due == 0
    assert tick(db, cfg, now=T0 + 6 + STABLE + 1).scheduled == [study]
    assert study_row(db, study).complete_rule == "stable"


def test_discontinued_step_counts_as_finished(db: Database, cfg: NodeConfig, feed: Feed) -> None:
    """A DISCONTINUED step (PS3.4 F.7) lists what was acquired before it stopped."""
    study = generate_uid()
    _, sops = feed.series(study, 2, T0)
    add_mpps(db, study, "DISCONTINUED", sops, at=T0 + 1)
    assert tick(db, cfg, now=T0 + 2).scheduled == [study]
    assert study_row(db, study).complete_rule == "mpps"


def test_mpps_in_progress_or_partial_waits_for_the_quiet_rule(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    a, b = generate_uid(), generate_uid()
    _, sops_a = feed.series(a, 2, T0)
    _, sops_b = feed.series(b, 2, T0)
    add_mpps(db, a, "IN PROGRESS", sops_a, at=T0 + 1)
    add_mpps(db, b, "COMPLETED", sops_b, at=T0 + 1)
    add_mpps(db, b, "IN PROGRESS", [], at=T0 + 1)  # a second step still running
    assert tick(db, cfg, now=T0 + 2).due == 0
    report = tick(db, cfg, now=T0 + STABLE + 1)
    assert sorted(report.scheduled) == sorted([a, b])
    assert {study_row(db, u).complete_rule for u in (a, b)} == {"stable"}


def set_expected(db: Database, study: str, n: int) -> None:
    with db.session() as s:
        stmt = update(Study).where(Study.study_instance_uid == study)
        s.execute(stmt.values(expected_instances=n))


def test_stated_instance_count_completes_the_study(
    db: Database, cfg: NodeConfig, feed: Feed
) -> None:
    study = generate_uid()
    series, _ = feed.series(study, 2, T0)
    set_expected(db, study, 3)
    assert tick(db, cfg, now=T0 + 1).due == 0
    feed.add(study, series, T0 + 2)
    assert tick(db, cfg, now=T0 + 3).scheduled == [study]
    row = study_row(db, study)
    assert row.complete_rule == "count" and row.complete_at == T0 + 3
    feed.add(study, series, T0 + 4)  # one more than stated: back to the quiet rule
    assert tick(db, cfg, now=T0 + 5).due == 0
    assert tick(db, cfg, now=T0 + 4 + STABLE + 1).scheduled == [study]
    assert study_row(db, study).complete_rule == "stable"


@pytest.mark.postgres
def test_exact_rules_on_postgresql(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The same rules through PostgreSQL's SQL (JSON lists, the MPPS subquery)."""
    cfg = make_cfg(tmp_path)
    db = init_db(request.getfixturevalue("pg_url"))
    try:
        feed = Feed(db, cfg)
        retrieved, reported, counted = generate_uid(), generate_uid(), generate_uid()
        feed.series(retrieved, 1, T0)
        _, sops = feed.series(reported, 2, T0)
        feed.series(counted, 2, T0)
        mark_complete(db, retrieved, CompleteRule.RETRIEVE, at=T0 + 1)
        add_mpps(db, reported, "COMPLETED", sops, at=T0 + 1)
        set_expected(db, counted, 2)
        report = tick(db, cfg, now=T0 + 2)
        assert sorted(report.scheduled) == sorted([retrieved, reported, counted])
        rules = {u: study_row(db, u).complete_rule for u in (retrieved, reported, counted)}
        assert rules == {retrieved: "retrieve", reported: "mpps", counted: "count"}
    finally:
        db.dispose()
