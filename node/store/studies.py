"""Exact completeness signals written onto ``studies`` by whoever sees them.

The scheduler (:mod:`node.schedule.scheduler`) reads ``complete_at``: a study whose
``complete_at`` is not older than its newest instance is complete at once, without
waiting for ``study.stable_after_s``.  A later instance makes the signal stale and the
study falls back to the time rules.
"""

from __future__ import annotations

from sqlalchemy import update

from node.store.db import CompleteRule, Database, Study, now

__all__ = ["mark_complete"]


def mark_complete(
    db: Database, study_instance_uid: str, rule: CompleteRule, *, at: float | None = None
) -> bool:
    """Record that ``rule`` found the study complete at ``at`` (default: now).

    Returns False when the node holds no instance of the study (nothing to complete).
    """
    t = now() if at is None else at
    with db.session() as s:
        res = s.execute(
            update(Study)
            .where(Study.study_instance_uid == study_instance_uid)
            .values(complete_at=t, complete_rule=rule.value)
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]
