"""The ``airnode`` command line.

Each subcommand is thin: it loads and validates the configuration once, then hands it
to the stage's own ``run`` function, imported lazily so that ``airnode echo`` never
pays for onnxruntime or torch.  Errors a user can meet end in one line on stderr and
exit code 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from node.config import ConfigError, NodeConfig, load_config
from node.errors import UserError

app = typer.Typer(
    name="airnode",
    help="PACS-integrated DICOM AI node.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (default: embedded defaults)."),
]
ReplicaOpt = Annotated[
    int,
    typer.Option(
        "--replica",
        min=0,
        help="Index of this copy of the stage (a worker runs on GPU replica % visible GPUs).",
    ),
]

db_app = typer.Typer(no_args_is_help=True)


def _config(path: Path | None) -> NodeConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"airnode {version('airnode')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """PACS-integrated DICOM AI node."""


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Start every stage (receiver, scheduler, workers, sender, HTTP) under a supervisor."""
    from node.ops.supervisor import run

    run(_config(config))


@app.command()
def receive(config: ConfigOpt = None) -> None:
    """Start only the DICOM receiver (C-ECHO, C-STORE)."""
    cfg = _config(config)
    if cfg.node.receiver_processes > 1:
        # Replicas are supervised like any stage: restarted on crash, stopped together.
        from node.ops.supervisor import receiver_stage
        from node.ops.supervisor import run as supervise

        supervise(cfg, [receiver_stage(cfg)])
    else:
        from node.receive import run

        run(cfg)


@app.command()
def schedule(config: ConfigOpt = None) -> None:
    """Start only the scheduler (study completion, routing, infer jobs, lease reaper)."""
    from node.schedule.scheduler import run

    run(_config(config))


@app.command()
def work(config: ConfigOpt = None, replica: ReplicaOpt = 0) -> None:
    """Start one inference worker (one per GPU: --replica picks the GPU)."""
    from node.work.worker import run

    run(_config(config), replica)


@app.command()
def send(config: ConfigOpt = None) -> None:
    """Start only the sender (delivers results to the destinations)."""
    from node.deliver import run

    run(_config(config))


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Migrate the database to the schema this airnode needs (serve does it at start)."""
    from node.store.db import init_db, schema_revision

    cfg = _config(config)
    try:
        db = init_db(cfg.node.resolved_database_url)
    except Exception as exc:  # one line; the URL may hold a password, so not echoed
        first = (str(exc).splitlines() or [""])[0][:200]
        raise UserError(f"cannot migrate the database: {type(exc).__name__}: {first}") from None
    try:
        typer.echo(f"database schema is at {schema_revision(db)}")
    finally:
        db.dispose()


@db_app.command("revision")
def db_revision(config: ConfigOpt = None) -> None:
    """Show the database's schema revision and the one this airnode needs."""
    from node.store.db import Database, head_revision, schema_revision

    cfg = _config(config)
    db = Database(cfg.node.resolved_database_url)
    try:
        at = schema_revision(db)
    finally:
        db.dispose()
    need = head_revision()
    typer.echo(f"database schema is at {at or 'none'}, this airnode needs {need}")
    if at != need:
        raise typer.Exit(1)


@app.command()
def purge(
    config: ConfigOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")
    ] = False,
) -> None:
    """Remove finished studies and result files by [retention] age and disk watermarks."""
    from node.store.db import open_db
    from node.store.retention import purge as run_purge

    cfg = _config(config)
    db = open_db(cfg.node.resolved_database_url)
    try:
        report = run_purge(db, cfg, dry_run=dry_run)
    finally:
        db.dispose()
    verb = "would remove" if dry_run else "removed"
    for r in report.removals:
        what = "study" if r.kind == "study" else "result"
        typer.echo(f"{verb} {what} {r.uid}: {r.files} file(s), {r.bytes} bytes ({r.reason})")
    after = report.after
    typer.echo(
        f"{len(report.removals)} item(s), {report.files} file(s), {report.bytes} bytes "
        f"{verb}" + (f"; spool file system {after.used_percent:.1f} % used" if after else "")
    )
    if report.short:
        typer.echo("still short of space: every other study has unfinished jobs", err=True)


@app.command()
def echo(
    host: str,
    port: int,
    ae_title: Annotated[str, typer.Option("--aet", help="Called AE title.")] = "ANY-SCP",
    calling: Annotated[str, typer.Option("--calling-aet", help="Our AE title.")] = "AIRNODE",
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 10.0,
) -> None:
    """Send a C-ECHO (DICOM ping) to HOST PORT and report the status."""
    from node.dimse import echo as do_echo

    status = do_echo(host, port, ae_title=ae_title, calling_ae_title=calling, timeout=timeout)
    if status != 0:
        raise UserError(f"C-ECHO to {ae_title}@{host}:{port} failed: {status:#06x}")
    typer.echo(f"C-ECHO to {ae_title}@{host}:{port}: success")


@app.command()
def fetch(
    source: Annotated[str, typer.Option("--source", help="A [[sources]] name.")],
    config: ConfigOpt = None,
    study: Annotated[str | None, typer.Option("--study", help="Study Instance UID.")] = None,
    accession: Annotated[str | None, typer.Option("--accession", help="Accession Number.")] = None,
    patient_id: Annotated[str | None, typer.Option("--patient-id", help="Patient ID.")] = None,
    modality: Annotated[
        str | None, typer.Option("--modality", help="Only studies holding this modality.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only studies of the last 12h, 2d, 1w...")
    ] = None,
) -> None:
    """Find studies on a PACS (C-FIND) and pull them into the node (C-MOVE or C-GET).

    A study retrieved in full is complete at once: its jobs start without the
    stable_after_s wait.  With retrieve = "move" the receiver must be running.
    """
    from node.ops.fetch import Query
    from node.ops.fetch import fetch as do_fetch

    query = Query(study, accession, patient_id, modality, since)
    results = do_fetch(_config(config), source, query)
    for r in results:
        typer.echo(r.line())
    missing = sum(1 for r in results if not r.complete)
    if missing:
        raise UserError(f"{missing} of {len(results)} stud(ies) not retrieved completely")


@app.command()
def demo(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Node host (default: [node] host).")] = None,
    port: Annotated[int | None, typer.Option(help="Node port (default: [node] port).")] = None,
    ae_title: Annotated[
        str | None, typer.Option("--aet", help="Called AE title (default: [node] ae_title).")
    ] = None,
    calling: Annotated[str, typer.Option("--calling-aet", help="Our AE title.")] = "DEMO-SCU",
    dx: Annotated[int, typer.Option("--dx", help="Number of DX studies (one image each).")] = 1,
    ct: Annotated[int, typer.Option("--ct", help="Number of CT studies (one series each).")] = 1,
    slices: Annotated[int, typer.Option(help="Slices per CT series.")] = 64,
    seed: Annotated[
        int | None, typer.Option(help="Seed for images and UIDs (default: a new one).")
    ] = None,
    with_nodule: Annotated[
        bool, typer.Option("--with-nodule/--without", help="Draw a nodule / lesion or not.")
    ] = True,
) -> None:
    """Send synthetic DX and CT studies to a running node (C-STORE), like a scanner."""
    from node.ops.demo import DemoError, run_demo

    cfg = _config(config)
    try:
        report = run_demo(
            cfg,
            host=host,
            port=port,
            ae_title=ae_title,
            calling_ae_title=calling,
            dx=dx,
            ct=ct,
            slices=slices,
            seed=seed,
            with_nodule=with_nodule,
        )
    except DemoError as exc:
        raise UserError(str(exc)) from None
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise UserError(f"{report.instances - report.stored} instance(s) were not stored")


def _register_optional() -> None:
    """Subcommand groups that live in their own modules."""
    from node.ops.jobs_cli import app as jobs_app
    from node.ops.studies_cli import app as studies_app

    app.add_typer(jobs_app, name="jobs", help="List, inspect, retry and cancel jobs.")
    app.add_typer(db_app, name="db", help="Database schema: upgrade, revision.")
    app.add_typer(
        studies_app, name="studies", help="List studies; have their routes evaluated again."
    )
    try:
        from training.cli import register as register_training
    except ImportError:  # training/ not installed (serving-only deployment)
        return
    register_training(app)


def _is_user_error(exc: Exception) -> bool:
    """The node's :class:`UserError`, or the training commands' own one-line error."""
    if isinstance(exc, UserError):
        return True
    try:
        from training.cli import CliError
    except ImportError:
        return False
    return isinstance(exc, CliError)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    _register_optional()
    try:
        rv = app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:
        if _is_user_error(exc):
            typer.echo(f"airnode: {exc}", err=True)
            return 2
        # Usage errors (unknown command, bad option) come from the click that typer
        # vendors; they know how to print themselves and which exit code they mean.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            return code
        raise
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so that the commands registered
    # by subcommand modules are those of the app that main() runs.
    from node.ops.cli import main as _main

    sys.exit(_main())
