"""``airnode studies``: a study held back by a missing model runs once it is installed
and an operator asks for its routes to be evaluated again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import load_config
from node.ops.cli import main
from node.ops.synthetic import ct_series
from node.schedule.scheduler import tick
from node.store.db import Job, JobKind, Study, StudyState, init_db
from tests.node.work.test_worker import receive
from tests.peers import fake_packages, write_config


def test_reroute_after_installing_the_missing_model_creates_its_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    path = write_config(
        tmp_path / "airnode.toml",
        {
            "node": {"data_dir": str(tmp_path / "data")},
            "study": {"stable_after_s": 1.0},
            "inference": {"backend": "fake", "model_dirs": [str(models)]},
            "routes": [{"name": "ct", "model": "ct-lesion", "match": {"Modality": ["CT"]}}],
        },
    )
    cfg = load_config(path)
    db = init_db(cfg.node.resolved_database_url)
    study = ct_series(n_slices=3, rows=32, cols=32, seed=5)
    receive(db, cfg, study)
    uid = str(study[0].StudyInstanceUID)

    def state() -> tuple[StudyState, str, int]:
        with db.read() as s:
            st = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
            n = len(s.scalars(select(Job).where(Job.kind == JobKind.INFER)).all())
            return st.state, st.note or "", n

    later = time.time() + 3600
    tick(db, cfg, now=later)
    st, note, n = state()
    assert (st, n) == (StudyState.UNROUTED, 0) and "unknown model 'ct-lesion'" in note

    fake_packages(models)  # the administrator installs the package
    tick(db, cfg, now=later + 1)
    assert state()[2] == 0  # nothing happens by itself

    assert main(["studies", "reroute", "--unrouted", "--config", str(path)]) == 0
    assert "1 study queued" in capsys.readouterr().out
    assert state()[0] == StudyState.RECEIVING
    tick(db, cfg, now=later + 2)
    st, note, n = state()
    assert (st, n) == (StudyState.SCHEDULED, 1) and "ct-lesion@" in note

    # Asking again creates no second job for the same input and model version.
    assert main(["studies", "reroute", uid, "--config", str(path)]) == 0
    tick(db, cfg, now=later + 3)
    assert state()[2] == 1

    capsys.readouterr()
    assert main(["studies", "list", "--json", "--config", str(path)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["study_instance_uid"] == uid and row["state"] == "scheduled"
    db.dispose()


def test_reroute_without_a_selection_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path / "a.toml", {"node": {"data_dir": str(tmp_path / "d")}})
    assert main(["studies", "reroute", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--unrouted" in err[0]
