"""``airnode jobs list|show|retry|cancel``: operator view of the job table."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from node.config import ConfigError, load_config, priority_name
from node.errors import UserError
from node.store import jobs
from node.store.db import Database, Job, JobKind, JobStatus, open_db

app = typer.Typer(no_args_is_help=True)
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML configuration.")]


def _db(config: Path | None) -> Database:
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    return open_db(cfg.node.resolved_database_url)  # never migrates: `airnode db upgrade`


def _ts(t: float | None) -> str:
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _get(db: Database, job_id: int) -> Job:
    with db.read() as s:
        job = s.get(Job, job_id)
    if job is None:
        raise UserError(f"no job with id {job_id} (see `airnode jobs list`)")
    return job


@app.command("list")
def list_jobs(
    config: ConfigOpt = None,
    status: Annotated[JobStatus | None, typer.Option(help="Only this status.")] = None,
    kind: Annotated[JobKind | None, typer.Option(help="Only this kind.")] = None,
    limit: Annotated[int, typer.Option(help="Most recent N.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines output.")] = False,
) -> None:
    """List jobs, newest first."""
    db = _db(config)
    q = select(Job).order_by(Job.id.desc()).limit(limit)
    if status is not None:
        q = q.where(Job.status == status)
    if kind is not None:
        q = q.where(Job.kind == kind)
    with db.read() as s:
        rows = s.scalars(q).all()
    if as_json:
        for j in rows:
            typer.echo(json.dumps(_as_dict(j)))
        return
    table = Table(
        "id", "kind", "priority", "status", "attempts", "model / destination", "updated", "error"
    )
    for j in rows:
        target = j.destination or str(j.payload.get("model") or "")  # shown even if invalid
        table.add_row(
            str(j.id),
            str(j.kind),
            priority_name(j.priority),
            str(j.status),
            str(j.attempts),
            target,
            _ts(j.updated_at),
            (j.last_error or "")[:60],
        )
    Console().print(table)


def _as_dict(j: Job) -> dict[str, object]:
    return {
        "id": j.id,
        "kind": str(j.kind),
        "status": str(j.status),
        "key": j.idempotency_key,
        "priority": j.priority,
        "attempts": j.attempts,
        "max_attempts": j.max_attempts,
        "payload": j.payload,
        "not_before": j.not_before,
        "lease_owner": j.lease_owner,
        "lease_expires_at": j.lease_expires_at,
        "last_error": j.last_error,
        "created_at": j.created_at,
        "updated_at": j.updated_at,
        "finished_at": j.finished_at,
        "parent_id": j.parent_id,
    }


@app.command()
def show(job_id: int, config: ConfigOpt = None) -> None:
    """Show one job in full (JSON)."""
    typer.echo(json.dumps(_as_dict(_get(_db(config), job_id)), indent=2))


def _operate(job_id: int, config: Path | None, action: Callable[[Database, int], Job]) -> Job:
    """Run an operator action on one job; a refused transition is a one-line error."""
    db = _db(config)
    _get(db, job_id)
    try:
        return action(db, job_id)
    except jobs.IllegalTransition as exc:
        raise UserError(f"job {job_id}: {exc}") from None


@app.command("retry")
def retry_job(job_id: int, config: ConfigOpt = None) -> None:
    """Put a dead or failed job back in the queue."""
    job = _operate(job_id, config, jobs.retry)
    typer.echo(f"job {job.id} queued again")


@app.command("cancel")
def cancel_job(job_id: int, config: ConfigOpt = None) -> None:
    """End a queued or failed job (it becomes dead)."""
    job = _operate(job_id, config, lambda db, jid: jobs.cancel(db, jid))
    typer.echo(f"job {job.id} cancelled")
