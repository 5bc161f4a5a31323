"""``/health``: is this node able to accept and process studies right now?

Healthy (HTTP 200) means: the job table answers and its file is still the one the
node opened, writable (a deleted or replaced SQLite file keeps answering on the
unlinked copy, so ``SELECT 1`` alone would say all is well); the spool accepts a new
file; the data directory's file system has more free space than the receiver's
reserve (below it, and in each of these cases, C-STORE answers 0xA700); and,
when a supervisor runs, it is alive and no stage is ``fatal`` (crash loop).  A stage
that is merely being restarted does not fail the check, so that one crash does not
page anyone; a crash loop does.  Anything else is 503, with the failing check named.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

from node.store.db import Database

__all__ = ["STALE_AFTER_S", "health"]

#: The supervisor rewrites its status file every second; older than this, it is gone.
STALE_AFTER_S = 10.0


def _database(db: Database) -> dict[str, Any]:
    try:
        with db.read() as s:
            s.execute(text("SELECT 1"))
    except Exception as exc:
        return {"ok": False, "error": f"database unreachable ({type(exc).__name__})"}
    problem = db.file_problem()
    if problem is not None:
        return {"ok": False, "error": f"{problem}; the receiver refuses images (0xA700)"}
    return {"ok": True}


def _spool(spool_dir: Path) -> dict[str, Any]:
    """Create and remove a file where the receiver writes its temp files."""
    if not spool_dir.exists():
        return {"ok": True, "note": "no spool yet"}
    probe = spool_dir / "tmp" / f".health-{os.getpid()}"
    try:
        probe.parent.mkdir(exist_ok=True)
        with probe.open("wb") as f:
            f.write(b"x")
        probe.unlink()
    except OSError as exc:
        return {"ok": False, "error": f"spool not writable ({exc.strerror or exc})"}
    return {"ok": True}


def _disk(data_dir: Path, min_free_bytes: int) -> dict[str, Any]:
    try:
        free = shutil.disk_usage(data_dir).free
    except OSError as exc:
        return {"ok": False, "error": f"data_dir unreadable ({exc.strerror})"}
    out: dict[str, Any] = {
        "ok": free >= min_free_bytes,
        "free_bytes": free,
        "min_free_bytes": min_free_bytes,
    }
    if not out["ok"]:
        out["error"] = "free space below the reserve; the receiver refuses images (0xA700)"
    return out


def _stages(status: dict[str, Any] | None, now: float) -> dict[str, Any]:
    if status is None:
        return {"ok": True, "supervisor": "absent", "stages": {}}
    stages = status.get("stages", {})
    stages = stages if isinstance(stages, dict) else {}
    updated = status.get("updated_at", 0.0)
    if status.get("stopped"):
        return {"ok": False, "supervisor": "stopped", "stages": stages, "error": "node stopped"}
    if not isinstance(updated, int | float) or now - updated > STALE_AFTER_S:
        return {
            "ok": False,
            "supervisor": "stale",
            "stages": stages,
            "error": f"supervisor has not reported for over {STALE_AFTER_S:.0f} s",
        }
    fatal = sorted(
        n for n, s in stages.items() if isinstance(s, dict) and s.get("state") == "fatal"
    )
    out: dict[str, Any] = {"ok": not fatal, "supervisor": "running", "stages": stages}
    if fatal:
        out["error"] = f"stage(s) in crash loop, not restarted: {', '.join(fatal)}"
    return out


def health(
    db: Database,
    data_dir: Path,
    min_free_bytes: int,
    stage_status: Callable[[], dict[str, Any] | None],
) -> tuple[int, dict[str, Any]]:
    """The HTTP status (200/503) and the JSON body of ``/health``."""
    t = time.time()
    checks = {
        "database": _database(db),
        "spool": _spool(data_dir / "spool"),
        "disk": _disk(data_dir, min_free_bytes),
        "stages": _stages(stage_status(), t),
    }
    ok = all(c["ok"] for c in checks.values())
    return (200 if ok else 503), {"status": "ok" if ok else "fail", "time": t, "checks": checks}
