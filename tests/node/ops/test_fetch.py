"""``airnode fetch``: pull a study from Orthanc by C-MOVE and by C-GET.

Orthanc holds a study that was never pushed to the node.  ``airnode fetch
--accession`` finds it (C-FIND) and retrieves it; because the retrieve completed, the
study is complete at once: the infer job starts although ``stable_after_s`` is 600 s,
and the results land back in Orthanc.  The error paths (unknown source, unreachable
PACS, refused C-FIND, nothing found) each end in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import select

from node.ops.cli import main
from node.ops.demo import demo_studies
from node.ops.fetch import Query
from node.ops.synthetic import ct_series, write_series
from node.store.db import Database, Job, JobKind, Study, StudyState, init_db
from tests.conftest import free_port
from tests.peers import REPO, airnode_serve, fake_packages, orthanc, write_config

SR = "1.2.840.10008.5.1.4.1.1.88.34"
#: Far longer than the test may run: only the exact rule can start the job.
STABLE_S = 600.0


def node_config(
    tmp: Path, node_port: int, http_port: int, pacs_port: int, retrieve: str, **src: Any
) -> Path:
    """The node's config, its database created as `airnode db upgrade` would."""
    init_db(f"sqlite:///{tmp / 'data' / 'airnode.sqlite'}").dispose()
    return write_config(
        tmp / "airnode.toml",
        {
            "node": {"ae_title": "AIRNODE", "port": node_port, "data_dir": str(tmp / "data")},
            "study": {"stable_after_s": STABLE_S, "force_after_s": 3600.0},
            "inference": {"backend": "fake", "model_dirs": [str(fake_packages(tmp / "pkgs"))]},
            "http": {"enabled": True, "port": http_port},
            "send": {"base_delay_s": 0.5, "max_delay_s": 5.0},
            "destinations": [
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}
            ],
            "sources": [
                {
                    "name": "pacs",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": pacs_port,
                    "retrieve": retrieve,
                    **src,
                }
            ],
            "routes": [
                {"name": "cxr", "model": "cxr-nodule", "match": {"Modality": ["DX"]}},
                {
                    "name": "cxr-to-pacs",
                    "model": "cxr-nodule",
                    "match": {"Modality": ["DX"]},
                    "send_to": ["pacs"],
                },
            ],
        },
    )


def airnode(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("airnode")
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
    )


def orthanc_classes(base: str, study_uid: str) -> set[str]:
    hits = requests.post(f"{base}/tools/lookup", data=study_uid, timeout=10).json()
    ids = [h["ID"] for h in hits if h["Type"] == "Study"]
    if not ids:
        return set()
    out = set()
    for inst in requests.get(f"{base}/studies/{ids[0]}/instances", timeout=10).json():
        r = requests.get(f"{base}/instances/{inst['ID']}/metadata/SopClassUid", timeout=10)
        out.add(r.text.strip())
    return out


@pytest.fixture
def pacs_with_a_study(tmp_path: Path) -> Iterator[tuple[str, int, int, list[Dataset]]]:
    """Orthanc holding one DX study (never sent to the node), which knows the node."""
    pacs_port, pacs_http, node_port = free_port(), free_port(), free_port()
    ((_, _, dx),) = list(demo_studies(dx=1, ct=0, seed=31, dx_size=128))
    files = write_series(dx, tmp_path / "in")
    mods = {"airnode": ("AIRNODE", "127.0.0.1", node_port)}
    with orthanc(tmp_path / "orthanc", pacs_port, pacs_http, mods) as base:
        for f in files:
            requests.post(f"{base}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
        yield base, pacs_port, node_port, dx


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_fetch_by_accession_completes_at_once_and_results_reach_the_pacs(
    tmp_path: Path, pacs_with_a_study: tuple[str, int, int, list[Dataset]], retrieve: str
) -> None:
    base, pacs_port, node_port, dx = pacs_with_a_study
    study_uid, accession = str(dx[0].StudyInstanceUID), str(dx[0].AccessionNumber)
    cfg = node_config(tmp_path, node_port, free_port(), pacs_port, retrieve)
    with airnode_serve(cfg, tmp_path / "airnode.log", ready_port=node_port) as node:
        t0 = time.monotonic()
        done = airnode("fetch", "--config", str(cfg), "--source", "pacs", "--accession", accession)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == (
            f"study {study_uid}: found {len(dx)}, retrieved {len(dx)}, failed 0 (complete)"
        )
        deadline = time.monotonic() + 90
        while SR not in orthanc_classes(base, study_uid):
            assert node.poll() is None, f"airnode serve exited: see {tmp_path / 'airnode.log'}"
            assert time.monotonic() < deadline, f"no SR in Orthanc; see {tmp_path / 'airnode.log'}"
            time.sleep(0.5)
        assert time.monotonic() - t0 < STABLE_S  # the quiet period could not have fired
        db = Database(f"sqlite:///{tmp_path / 'data' / 'airnode.sqlite'}")
        try:
            with db.read() as s:
                row = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
                infer = s.scalars(select(Job).where(Job.kind == JobKind.INFER)).all()
        finally:
            db.dispose()
        assert row is not None and row.instance_count == len(dx)
        assert row.state == StudyState.SCHEDULED and row.complete_rule == "retrieve"
        assert row.complete_at is not None and row.complete_at >= row.last_received_at
        assert len(infer) == 1 and infer[0].study_instance_uid == study_uid
        listed = airnode("studies", "list", "--json", "--config", str(cfg))
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [(r["study_instance_uid"], r["complete_rule"]) for r in rows] == [
            (study_uid, "retrieve")
        ]
        page = requests.get(f"http://127.0.0.1:{_http_port(cfg)}/", timeout=10).text
        assert 'data-rule="retrieve"' in page


def _http_port(cfg: Path) -> int:
    import tomllib

    return int(tomllib.loads(cfg.read_text())["http"]["port"])


def run_fetch(capsys: pytest.CaptureFixture[str], cfg: Path, *args: str) -> tuple[int, str]:
    code = main(["fetch", "--config", str(cfg), "--source", "pacs", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return code, err[0]


def test_unknown_source_and_missing_query_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = node_config(tmp_path, free_port(), free_port(), free_port(), "move")
    code = main(["fetch", "--config", str(cfg), "--source", "ris", "--study", "1.2.3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "airnode: unknown source 'ris' (known: pacs)"
    code, err = run_fetch(capsys, cfg)
    assert code == 2 and "--accession" in err
    code, err = run_fetch(capsys, cfg, "--patient-id", "P1", "--since", "yesterday")
    assert code == 2 and "--since 'yesterday'" in err


def test_unreachable_pacs_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    cfg = node_config(tmp_path, free_port(), free_port(), port, "get", timeout_s=2.0)
    code, err = run_fetch(capsys, cfg, "--accession", "A1")
    assert code == 2
    assert err == f"airnode: source pacs (ORTHANC@127.0.0.1:{port}): " + (
        "unreachable (connection refused or timed out)"
    )


def test_refused_c_find_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Q/R SCP that answers every C-FIND with 0xC001 (PS3.4 C.4.1.1.4: unable to process)."""
    seen: list[Dataset] = []

    def refuse(event: evt.Event) -> Iterator[tuple[int, None]]:
        seen.append(event.identifier)
        yield 0xC001, None

    scp = AE(ae_title="ORTHANC")
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, refuse)]
    )
    try:
        cfg = node_config(tmp_path, free_port(), free_port(), port, "move")
        code, err = run_fetch(
            capsys, cfg, "--patient-id", "P1", "--modality", "CT", "--since", "2d"
        )
    finally:
        assert server is not None
        server.shutdown()
    assert code == 2
    assert err.endswith("C-FIND refused: 0xC001 (unable to process)")
    (ident,) = seen
    assert ident.QueryRetrieveLevel == "STUDY" and ident.PatientID == "P1"
    assert ident.ModalitiesInStudy == "CT"
    assert len(ident.StudyDate) == 9 and ident.StudyDate.endswith("-")


@pytest.mark.integration
def test_no_matching_study_is_one_line(
    tmp_path: Path,
    pacs_with_a_study: tuple[str, int, int, list[Dataset]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, pacs_port, node_port, _ = pacs_with_a_study
    cfg = node_config(tmp_path, node_port, free_port(), pacs_port, "get")
    code, err = run_fetch(capsys, cfg, "--accession", "NO-SUCH-ACC")
    assert code == 2 and err.endswith("no study matches the query")


@pytest.mark.integration
def test_a_failed_sub_operation_leaves_the_study_to_the_time_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One instance of two is refused by the node (too large): the retrieve reports a
    failure, so the study is not marked complete; the instance that came is kept."""
    pacs_port, pacs_http, node_port = free_port(), free_port(), free_port()
    files = write_series(ct_series(n_slices=2, rows=32, cols=32, seed=8), tmp_path / "ct")
    big = dcmread(files[1])
    big.private_block(0x0009, "AIRNODE TEST", create=True).add_new(0x00, "OB", bytes(40_000))
    big.save_as(files[1])
    study_uid = str(big.StudyInstanceUID)
    mods = {"airnode": ("AIRNODE", "127.0.0.1", node_port)}
    with orthanc(tmp_path / "orthanc", pacs_port, pacs_http, mods) as base:
        for f in files:
            requests.post(f"{base}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
        cfg = node_config(tmp_path, node_port, free_port(), pacs_port, "get")
        cfg.write_text(cfg.read_text() + "\n[security]\nmax_instance_bytes = 20000\n")
        code = main(["fetch", "--config", str(cfg), "--source", "pacs", "--study", study_uid])
    out = capsys.readouterr()
    assert code == 2 and out.err.strip() == "airnode: 1 of 1 stud(ies) not retrieved completely"
    line = out.out.strip()
    assert line.startswith(f"study {study_uid}: found 2, retrieved 1, failed 1 (not complete: ")
    assert "; refused here: 0xC001 instance of " in line
    assert line.endswith(" bytes exceeds max_instance_bytes 20000)")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'airnode.sqlite'}")
    try:
        with db.read() as s:
            row = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    finally:
        db.dispose()
    assert row is not None and row.instance_count == 1
    assert row.complete_at is None and row.complete_rule is None


def test_query_keys_at_study_level() -> None:
    ident = Query(accession="A1", modality="CT", since="2d").identifier(
        today=datetime(2026, 3, 1, 9, 0)
    )
    assert ident.QueryRetrieveLevel == "STUDY"
    assert (ident.AccessionNumber, ident.ModalitiesInStudy) == ("A1", "CT")
    assert ident.StudyDate == "20260227-"  # two days before 1 March 2026
    assert ident.StudyInstanceUID == "" and ident.NumberOfStudyRelatedInstances == ""
    assert (
        Query(study_uid="1.2.3", since="36h").identifier(today=datetime(2026, 3, 1, 9, 0)).StudyDate
        == "20260227-"
    )
