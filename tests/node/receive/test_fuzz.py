"""A seeded corpus of a few hundred damaged files against a running receiver, then the
scheduler and a worker on whatever was acknowledged.

What must hold for every mutant: an answer other than 0xC211; C-ECHO still answered
after each batch; an acknowledged instance has its row (under the SOP Instance UID
it was sent with) and its file with the recorded SHA-256; the worker finishes every
job (done, or dead with a reason) and never dies.  ``bench/fuzz.py`` runs many more.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import NodeConfig
from node.schedule.scheduler import tick
from node.store.db import Job, JobKind, JobStatus, init_db
from node.work.worker import Worker
from tests.fuzz import mutants, send_raw
from tests.node.receive import test_server
from tests.node.receive.test_hostile import _echo_s
from tests.node.receive.test_server import Node
from tests.peers import _manifest

pytestmark = pytest.mark.integration

make_node = test_server.make_node  # the receiver-process fixture

SEED = 20261202
COUNT = 300
BATCH = 50
MODALITIES = ["CT", "MR", "NM", "OT", "RTDOSE", "RTPLAN", "SR", "SEG", "US"]


def _any_modality_package(root: Path) -> Path:
    from models.package import write_manifest

    manifest = _manifest("fuzz-any", "classification", "resnet18", 32, (40.0, 400.0))
    manifest["input"]["modalities"] = MODALITIES
    write_manifest(root / "fuzz-any", manifest)
    (root / "fuzz-any" / "model.onnx").write_bytes(b"not read by the fake backend")
    return root


@pytest.mark.filterwarnings("ignore")
def test_seeded_fuzz_corpus(make_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node: Node = make_node()
    corpus = list(mutants(SEED, COUNT))
    statuses: dict[str, int | None] = {}
    for i in range(0, COUNT, BATCH):
        statuses |= send_raw(node.port, corpus[i : i + BATCH], tmp_path / "send")
        assert _echo_s(node.port) < 5.0, f"no C-ECHO after batch {i // BATCH}"
    assert len(statuses) == COUNT
    counts = Counter(f"0x{s:04X}" if s is not None else "none" for s in statuses.values())
    print("fuzz statuses:", dict(sorted(counts.items())))
    assert "0xC211" not in counts and "none" not in counts, counts

    con = sqlite3.connect(node.data_dir / "airnode.sqlite")
    rows = dict(con.execute("SELECT sop_instance_uid, path || '|' || sha256 FROM instances"))
    con.close()
    acked = [uid for uid, s in statuses.items() if s == 0x0000]
    assert acked, "no mutant was stored at all"
    for uid in acked:
        assert uid in rows, f"acknowledged {uid} has no row"
        rel, digest = rows[uid].split("|")
        data = (node.spool / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest

    cfg = NodeConfig.model_validate(
        {
            "node": {"data_dir": str(node.data_dir)},
            "study": {"stable_after_s": 0.0},
            "inference": {
                "backend": "fake",
                "model_dirs": [str(_any_modality_package(tmp_path / "pkgs"))],
            },
            "routes": [{"name": "all", "model": "fuzz-any", "match": {}}],
        }
    )
    db = init_db(cfg.node.resolved_database_url)
    try:
        tick(db, cfg, now=time.time() + 3600)
        worker = Worker(cfg, db)
        ran = 0
        while worker.run_one():  # a BaseException escaping here is the worker dying
            ran += 1
        with db.read() as s:
            infer = list(s.scalars(select(Job).where(Job.kind == JobKind.INFER)))
    finally:
        db.dispose()
    assert ran == len(infer) > 0
    for job in infer:
        assert job.status in (JobStatus.DONE, JobStatus.DEAD), (job.id, job.status)
        if job.status == JobStatus.DEAD:
            assert job.last_error
