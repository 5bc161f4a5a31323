"""``airnode studies list|reroute``: operator view of studies and their routing.

``reroute`` puts studies back to ``receiving`` so the scheduler evaluates their
routes again on its next pass: after a route was added or changed, or after the
package of a model a route names was installed.  Jobs are idempotent, so studies
whose jobs already exist get no second job for the same input and model version.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import ColumnElement, or_, select, update

from node.errors import UserError
from node.ops.jobs_cli import ConfigOpt, _db, _ts
from node.store.db import Database, Study, StudyState, now

app = typer.Typer(no_args_is_help=True)


def reroute(db: Database, uids: list[str] | None = None, *, unrouted: bool = False) -> int:
    """Send studies back to the scheduler; returns how many were changed.

    ``uids`` names studies; ``unrouted`` selects every study in state ``unrouted``.
    """
    if not uids and not unrouted:
        raise ValueError("name study UIDs or select --unrouted")
    stmt = update(Study).values(
        state=StudyState.RECEIVING,
        note=f"re-evaluation requested by operator at {_ts(now())} UTC",
    )
    cond: list[ColumnElement[bool]] = []
    if uids:
        cond.append(Study.study_instance_uid.in_(uids))
    if unrouted:
        cond.append(Study.state == StudyState.UNROUTED)
    with db.session() as s:
        res = s.execute(stmt.where(or_(*cond)))
        return int(res.rowcount)  # type: ignore[attr-defined]


@app.command("list")
def list_studies(
    config: ConfigOpt = None,
    state: Annotated[StudyState | None, typer.Option(help="Only this state.")] = None,
    limit: Annotated[int, typer.Option(help="Most recent N.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines output.")] = False,
) -> None:
    """List studies, most recently received first (UIDs only, no patient data).

    ``complete by`` is the rule that found the study complete: retrieve, mpps, count
    (exact signals), stable or forced (time rules); empty while it is not.
    """
    db = _db(config)
    q = select(Study).order_by(Study.last_received_at.desc()).limit(limit)
    if state is not None:
        q = q.where(Study.state == state)
    with db.read() as s:
        rows = s.scalars(q).all()
    if as_json:
        for st in rows:
            typer.echo(
                json.dumps(
                    {
                        "study_instance_uid": st.study_instance_uid,
                        "state": str(st.state),
                        "instances": st.instance_count,
                        "last_received_at": st.last_received_at,
                        "scheduled_at": st.scheduled_at,
                        "complete_rule": st.complete_rule,
                        "note": st.note,
                    }
                )
            )
        return
    table = Table("study", "state", "complete by", "instances", "last image", "note")
    for st in rows:
        table.add_row(
            st.study_instance_uid,
            str(st.state),
            st.complete_rule or "",
            str(st.instance_count),
            _ts(st.last_received_at),
            (st.note or "")[:80],
        )
    Console().print(table)


@app.command("reroute")
def reroute_cmd(
    uids: Annotated[list[str] | None, typer.Argument(help="Study Instance UIDs.")] = None,
    config: ConfigOpt = None,
    unrouted: Annotated[
        bool, typer.Option("--unrouted", help="Every study that matched no usable route.")
    ] = False,
) -> None:
    """Have the scheduler evaluate the routes of these studies again."""
    if not uids and not unrouted:
        raise UserError("name one or more Study Instance UIDs, or use --unrouted")
    n = reroute(_db(config), uids, unrouted=unrouted)
    typer.echo(f"{n} stud{'y' if n == 1 else 'ies'} queued for re-evaluation")
