"""The acknowledgement order, proven on a running receiver: no 0x0000 leaves before
the instance's file fsync, the fsync of its directory and the commit of its row,
with several associations at once (their rows committed together by group commit).
A failure injected at any of the three steps turns the status into 0xA700."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy.exc import OperationalError

import node.receive.spool as spool_mod
import node.store.durable as durable
from node.config import NodeConfig
from node.ops.synthetic import ct_series
from node.receive.commit import GroupCommit
from node.receive.server import Receiver
from node.store.db import init_db
from node.store.durable import uid_path
from tests.conftest import free_port

ASSOCIATIONS = 4
PER_ASSOCIATION = 5


class Recorder:
    """A global, ordered log of (event, key) from every thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.final = threading.local()
        self.fail: dict[str, str] = {}  # step → SOP Instance UID whose step fails

    def add(self, event: str, key: str) -> None:
        with self.lock:
            self.events.append((event, key))

    def index(self, event: str, key: str) -> int:
        return self.events.index((event, key))


@contextmanager
def receiver_with_probes(
    tmp_path: Path, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> Iterator[int]:
    by_name: dict[str, str] = {}  # final file name → SOP Instance UID
    rec.by_name = by_name  # type: ignore[attr-defined]
    real_link = spool_mod.link_durable  # type: ignore[attr-defined]
    real_fsync_file, real_fsync_dir = durable.fsync_file, durable.fsync_dir
    real_apply = GroupCommit._apply

    def link_durable(tmp: Path, final: Path) -> bool:
        rec.final.uid = by_name.get(final.name, "?")
        try:
            return real_link(tmp, final)
        finally:
            rec.final.uid = None

    def fsync_file(path: Path) -> None:
        uid = getattr(rec.final, "uid", None)
        if uid is not None:
            if rec.fail.get("file") == uid:
                raise OSError(5, "injected fsync failure")
            real_fsync_file(path)
            rec.add("file", uid)
        else:
            real_fsync_file(path)

    def fsync_dir(path: Path) -> None:
        uid = getattr(rec.final, "uid", None)
        if uid is not None and rec.fail.get("dir") == uid:
            raise OSError(5, "injected directory fsync failure")
        real_fsync_dir(path)
        if uid is not None:
            rec.add("dir", uid)

    def apply(self: GroupCommit, rows: list[Any]) -> list[bool]:
        uids = [r.info.sop_instance_uid for r in rows]
        if rec.fail.get("commit") in uids:
            raise OperationalError("COMMIT", {}, Exception("injected commit failure"))
        out = real_apply(self, rows)
        for u in uids:
            rec.add("commit", u)
        rec.add("batch", str(len(uids)))
        return out

    monkeypatch.setattr(spool_mod, "link_durable", link_durable)
    monkeypatch.setattr(durable, "fsync_file", fsync_file)
    monkeypatch.setattr(durable, "fsync_dir", fsync_dir)
    monkeypatch.setattr(GroupCommit, "_apply", apply)
    chunked, level = _config.STORE_RECV_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL
    cfg = NodeConfig.model_validate(
        {
            "node": {"port": free_port(), "data_dir": str(tmp_path / "data")},
            "security": {"min_free_bytes": 0},
        }
    )
    init_db(cfg.node.resolved_database_url).dispose()  # as `airnode db upgrade`
    receiver = Receiver(cfg)
    _, port = receiver.start()
    assert receiver._server is not None

    def sent(event: evt.Event) -> None:
        msg = event.message
        cs = msg.command_set
        if cs.CommandField == 0x8001:  # C-STORE-RSP
            rec.add(f"sent:{int(cs.Status):04X}", str(cs.AffectedSOPInstanceUID))

    receiver._server.bind(evt.EVT_DIMSE_SENT, sent)
    try:
        yield port
    finally:
        receiver.stop()
        _config.STORE_RECV_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL = chunked, level


def _send_all(port: int, batches: list[list[Any]]) -> dict[str, int]:
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def one(datasets: list[Any]) -> None:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="AIRNODE")
        assert assoc.is_established
        for ds in datasets:
            st = assoc.send_c_store(ds)
            with lock:
                statuses[str(ds.SOPInstanceUID)] = int(st.Status)
        assoc.release()

    threads = [threading.Thread(target=one, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return statuses


@pytest.mark.parametrize("inject", [None, "file", "dir", "commit"])
def test_no_success_leaves_before_file_directory_and_row_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inject: str | None
) -> None:
    rec = Recorder()
    batches = [ct_series(PER_ASSOCIATION, 16, 16, seed=100 + i) for i in range(ASSOCIATIONS)]
    victim = str(batches[1][2].SOPInstanceUID)
    if inject:
        rec.fail[inject] = victim
    with receiver_with_probes(tmp_path, rec, monkeypatch) as port:
        for b in batches:
            for ds in b:
                rec.by_name[uid_path(str(ds.SOPInstanceUID)).name] = str(ds.SOPInstanceUID)  # type: ignore[attr-defined]
        statuses = _send_all(port, batches)
    assert len(statuses) == ASSOCIATIONS * PER_ASSOCIATION
    assert statuses[victim] == (0xA700 if inject else 0x0000), hex(statuses[victim])
    for uid, status in statuses.items():
        if status != 0x0000:
            # Only the victim, or a row committed in the victim's failed batch.
            assert status == 0xA700 and (uid == victim or inject == "commit"), hex(status)
            assert ("sent:0000", uid) not in rec.events
            continue
        sent = rec.index("sent:0000", uid)
        # The response to each instance was handed to the network only after all three.
        assert rec.index("file", uid) < sent
        assert rec.index("dir", uid) < sent
        assert rec.index("commit", uid) < sent
    if inject is None:  # concurrent associations did share commits
        assert any(e == "batch" and int(k) > 1 for e, k in rec.events) or pytest.skip(
            "no two rows met in one commit in this run"
        )
