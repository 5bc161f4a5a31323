#!/usr/bin/env python3
"""Fuzz run: many damaged files against a real receiver, then the scheduler and a worker.

    .venv/bin/python bench/fuzz.py [--count 10000] [--seed 1] [--minutes 10] [--write]

The mutants come from ``tests/fuzz.py`` (seeded: the same seed gives the same files).
``airnode receive`` runs as its own process; the mutants go out in associations of
100, unparsed (pynetdicom's chunked send); after each batch a C-ECHO must be
answered.  Then every acknowledged instance is checked (row under the UID it was sent
with, file with the recorded SHA-256), the scheduler creates jobs for everything
received and one worker runs them all with the fake backend (decoding every image a
model would see).  The run stops early after ``--minutes``; it reports how many
mutants were sent.  With ``--write`` the counts replace the "Fuzz run" section of
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import re
import resource
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from node.config import NodeConfig  # noqa: E402
from node.schedule.scheduler import tick  # noqa: E402
from node.store.db import Job, JobKind, JobStatus, init_db  # noqa: E402
from node.work.worker import Worker  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.fuzz import mutants, send_raw  # noqa: E402
from tests.node.receive.test_fuzz import _any_modality_package  # noqa: E402
from tests.node.receive.test_hostile import _echo_s  # noqa: E402
from tests.node.receive.test_server import _start, _stop, _write_cfg  # noqa: E402

BATCH = 100
WORKER_AS_BYTES = 8 * 1024**3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    t0 = time.monotonic()
    stop_at = t0 + args.minutes * 60
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="airnode-fuzz-") as tmp_s:
        tmp = Path(tmp_s)
        port = free_port()
        cfg_path = tmp / "node.toml"
        _write_cfg(cfg_path, port, tmp / "data", 'log_level = "WARNING"')
        node = _start(cfg_path, port, tmp / "data", tmp / "node.log")
        statuses: dict[str, int | None] = {}
        kinds: dict[str, str] = {}
        sent = 0
        try:
            batch = []
            for m in mutants(args.seed, args.count):
                kinds[m.sop_instance_uid] = m.kind
                batch.append(m)
                if len(batch) < BATCH:
                    continue
                statuses |= send_raw(port, batch, tmp / "send")
                sent += len(batch)
                batch = []
                if _echo_s(port) > 1.0:
                    problems.append(f"C-ECHO slower than 1 s after {sent} mutants")
                if node.proc.poll() is not None:
                    problems.append(f"receiver exited after {sent} mutants")
                    break
                if time.monotonic() > stop_at:
                    break
            if batch and time.monotonic() <= stop_at:
                statuses |= send_raw(port, batch, tmp / "send")
                sent += len(batch)
        finally:
            _stop(node)
        receive_s = time.monotonic() - t0
        con = sqlite3.connect(tmp / "data" / "airnode.sqlite")
        rows = {
            u: (p, h)
            for u, p, h in con.execute("SELECT sop_instance_uid, path, sha256 FROM instances")
        }
        con.close()
        counts = Counter(f"0x{s:04X}" if s is not None else "no answer" for s in statuses.values())
        acked = [u for u, s in statuses.items() if s == 0]
        for uid in acked:
            if uid not in rows:
                problems.append(f"acknowledged {kinds[uid]} mutant without a row")
                continue
            rel, digest = rows[uid]
            path = tmp / "data" / "spool" / rel
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                problems.append(f"acknowledged {kinds[uid]} mutant without its file")
        if "0xC211" in counts or "no answer" in counts:
            problems.append(f"statuses: {dict(counts)}")
        cfg = NodeConfig.model_validate(
            {
                "node": {"data_dir": str(tmp / "data"), "log_level": "WARNING"},
                "study": {"stable_after_s": 0.0},
                "inference": {
                    "backend": "fake",
                    "model_dirs": [str(_any_modality_package(tmp / "pkgs"))],
                },
                "routes": [{"name": "all", "model": "fuzz-any", "match": {}}],
            }
        )
        # The worker runs in this process: cap its address space, so that a mutant
        # that makes it allocate without bound fails its job instead of the machine.
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_AS_BYTES, WORKER_AS_BYTES))
        db = init_db(cfg.node.resolved_database_url)
        tick(db, cfg, now=time.time() + 3600)
        worker = Worker(cfg, db)
        try:
            while worker.run_one():
                pass
        except BaseException as exc:
            problems.append(f"worker died: {type(exc).__name__}")
        with db.read() as s:
            jobs = Counter(
                str(j.status) for j in s.scalars(select(Job).where(Job.kind == JobKind.INFER))
            )
            unreadable = sum(
                len(j.payload.get("unreadable", {}))
                for j in s.scalars(select(Job).where(Job.kind == JobKind.INFER))
                if j.status == JobStatus.DONE
            )
        db.dispose()
    total_s = time.monotonic() - t0
    by_kind = Counter(kinds[u] for u in statuses)
    lines = [
        f"Run: `.venv/bin/python bench/fuzz.py --count {args.count} --seed {args.seed} "
        f"--minutes {args.minutes:g}` on {platform.node()} ({platform.machine()}, Python "
        f"{platform.python_version()}, pydicom {version('pydicom')}, pynetdicom "
        f"{version('pynetdicom')}); {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        f"- mutants sent: **{sent}** of {args.count} asked "
        + ("(all)" if sent >= args.count else f"(stopped by the {args.minutes:g}-minute limit)")
        + f", in {receive_s:.0f} s; whole run {total_s:.0f} s",
        "- by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())),
        "- answers: " + ", ".join(f"{k} × {n}" for k, n in sorted(counts.items())),
        f"- acknowledged: {len(acked)}, each with its row and file: "
        f"{'yes' if not any('acknowledged' in p for p in problems) else 'NO'}",
        "- infer jobs: "
        + ", ".join(f"{k} {n}" for k, n in sorted(jobs.items()))
        + f"; images set aside as unreadable in finished jobs: {unreadable}",
        f"- problems: {'; '.join(sorted(set(problems))) if problems else 'none'}",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        doc = ROOT / "docs" / "reliability.md"
        text = doc.read_text(encoding="utf-8")
        section = f"## Fuzz run\n\n{report}\n"
        text = re.sub(r"## Fuzz run\n.*?(?=\n## |\Z)", section, text, flags=re.S)
        doc.write_text(text, encoding="utf-8")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
