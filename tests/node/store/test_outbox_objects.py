"""Which result objects each destination gets ([[destinations]] objects)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import ConfigError, NodeConfig, load_config
from node.results import encode_all, store_results
from node.store.db import Database, Job, JobKind
from tests.node.results.sources import ct_series, segmentation


def _sends(db: Database) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    with db.read() as s:
        for job in s.scalars(select(Job).where(Job.kind == JobKind.SEND)):
            out.setdefault(job.payload["destination"], set()).add(job.payload["sop_instance_uid"])
    return out


def test_each_destination_gets_the_kinds_it_asked_for(db: Database, tmp_path: Path) -> None:
    series = ct_series(n=6, size=32)
    objects = encode_all(segmentation(series), series, NodeConfig())
    by_kind: dict[str, set[str]] = {}
    for o in objects:
        kind = {"SR": "sr", "SEG": "seg", "OT": "sc", "PR": "pr"}[str(o.Modality)]
        by_kind.setdefault(kind, set()).add(str(o.SOPInstanceUID))
    assert set(by_kind) == {"sr", "seg", "sc", "pr"}
    store_results(
        db,
        tmp_path / "outbox",
        objects,
        model="m",
        infer_job_id=None,
        destinations=["pacs", "viewer"],
        objects={"pacs": ["sr", "seg", "sc", "pr"], "viewer": ["sc", "pr"]},
    )
    sends = _sends(db)
    assert sends["pacs"] == set().union(*by_kind.values())
    assert sends["viewer"] == by_kind["sc"] | by_kind["pr"]


def test_config_defaults_to_all_objects_and_rejects_unknown_kinds(tmp_path: Path) -> None:
    base = '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    path = tmp_path / "a.toml"
    path.write_text(base)
    assert load_config(path).destinations[0].objects == ["sr", "seg", "sc", "pr"]
    path.write_text(base + 'objects = ["sc", "pr"]\n')
    assert load_config(path).destinations[0].objects == ["sc", "pr"]
    path.write_text(base + 'objects = ["sc", "pdf"]\n')
    with pytest.raises(ConfigError, match="objects"):
        load_config(path)
