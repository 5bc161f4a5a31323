"""Versioned results: a series that arrives in two parts reaches the PACS corrected.

21 of 64 CT slices arrive, the node runs a lesion model and delivers to Orthanc; the
other 43 arrive later, the node runs again on all 64. Orthanc must end with both SR
versions, the newer naming the older in Predecessor Documents Sequence, a SEG of the
complete series whose voxel count matches the newer SR's volume; and a crash-and-rerun
of a job on unchanged input must produce no new UID and the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import requests
from pydicom import Dataset
from sqlalchemy import select

from node.config import NodeConfig
from node.deliver.sender import Sender
from node.ops.demo import demo_studies
from node.store.db import Database, Job, JobKind, Result, init_db
from node.work.worker import Worker
from tests.conftest import free_port
from tests.node.work.test_worker import receive, schedule
from tests.peers import orthanc, tiny_onnx_packages

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SR, SEG = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[str, int]]:
    dicom_port, http_port = free_port(), free_port()
    with orthanc(tmp_path / "orthanc", dicom_port, http_port) as base:
        yield base, dicom_port


def _cfg(tmp: Path, pacs_port: int) -> NodeConfig:
    # Tiny ONNX nets that always find a lesion: the test is about versions, not about
    # the demo model's accuracy (docs/evaluation/).
    packages = tiny_onnx_packages(tmp / "packages")
    return NodeConfig.model_validate(
        {
            "node": {"data_dir": str(tmp / "data")},
            "study": {"stable_after_s": 1.0},
            "inference": {"backend": "onnxruntime", "model_dirs": [str(packages)]},
            "destinations": [
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}
            ],
            "routes": [
                {
                    "name": "ct",
                    "model": "ct-lesion",
                    "match": {"Modality": ["CT"]},
                    "send_to": ["pacs"],
                }
            ],
        }
    )


def _run(db: Database, cfg: NodeConfig) -> list[str]:
    """Schedule, infer and deliver everything due; the new job's result UIDs."""
    (job_id,) = schedule(db, cfg)
    assert Worker(cfg, db).run_one()
    sender = Sender(cfg, db)
    while sender.send_batch(cfg.destinations[0]):
        pass
    with db.read() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status.value == "done", job and job.last_error
        return [str(u) for u in job.payload["result_sop_instance_uids"]]


def _orthanc_objects(base: str, study_uid: str) -> dict[str, list[Dataset]]:
    found = requests.post(f"{base}/tools/lookup", data=study_uid, timeout=10).json()
    (study_id,) = [r["ID"] for r in found if r["Type"] == "Study"]
    out: dict[str, list[Dataset]] = {}
    for inst in requests.get(f"{base}/studies/{study_id}/instances", timeout=10).json():
        raw = requests.get(f"{base}/instances/{inst['ID']}/file", timeout=10).content
        ds = pydicom.dcmread(io.BytesIO(raw))
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def test_late_slices_make_a_new_version_that_reaches_the_pacs(
    tmp_path: Path, pacs: tuple[str, int]
) -> None:
    base, pacs_port = pacs
    cfg = _cfg(tmp_path, pacs_port)
    db = init_db(cfg.node.resolved_database_url)
    ((_, _, series),) = list(demo_studies(dx=0, ct=1, slices=64, ct_size=128))
    study_uid = str(series[0].StudyInstanceUID)

    receive(db, cfg, series[:21])
    first = _run(db, cfg)
    receive(db, cfg, series[21:])
    second = _run(db, cfg)
    assert first and second and not set(first) & set(second)

    objects = _orthanc_objects(base, study_uid)
    srs = {str(d.SOPInstanceUID): d for d in objects[SR]}
    # The presentation state of the new version sits in the source study too, pointing
    # at the source slices (the first part may hold no lesion, hence no annotation).
    assert any(str(pr.SOPInstanceUID) in second for pr in objects[GSPS])
    source_uids = {str(d.SOPInstanceUID) for d in series}
    for pr in objects[GSPS]:
        refs = pr.ReferencedSeriesSequence[0].ReferencedImageSequence
        assert {str(r.ReferencedSOPInstanceUID) for r in refs} <= source_uids
    assert len(srs) == 2
    old_uid = next(u for u in first if u in srs)
    new = srs[next(u for u in second if u in srs)]
    old = srs[old_uid]
    assert new.SeriesInstanceUID == old.SeriesInstanceUID  # versions share the series
    pred = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_uid
    assert "PredecessorDocumentsSequence" not in old

    # The newer SR's volume is the voxel count of the SEG it references × voxel volume,
    # and that SEG covers the complete series.
    report = hd.sr.Comprehensive3DSR.from_dataset(new)
    (group,) = report.content.get_volumetric_roi_measurement_groups()  # type: ignore[attr-defined]
    (volume,) = [m for m in group.get_measurements() if m.name.value == "118565006"]
    seg_uid = group.referenced_segment.referenced_sop_instance_uid
    seg = hd.seg.Segmentation.from_dataset(
        next(d for d in objects[SEG] if d.SOPInstanceUID == seg_uid)
    )
    assert seg_uid in second
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    voxel = float(measures.PixelSpacing[0]) * float(measures.PixelSpacing[1])
    voxel *= float(measures.get("SpacingBetweenSlices") or measures.SliceThickness)
    voxels = int((seg.pixel_array > 0).sum())
    assert volume.value == pytest.approx(voxels * voxel, rel=1e-6)
    sources = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    late = {str(d.SOPInstanceUID) for d in series[21:]}
    assert sources & late, "the new SEG must cover slices of the second part"

    # Crash and re-run of the second job on unchanged input: no new UID, same bytes.
    with db.read() as s:
        job = s.scalars(
            select(Job).where(Job.kind == JobKind.INFER).order_by(Job.id.desc())
        ).first()
        assert job is not None
        before = {r.sop_instance_uid: r.path for r in s.scalars(select(Result))}
    files = {u: (cfg.node.outbox_dir / p).read_bytes() for u, p in before.items() if u in second}
    for p in cfg.node.outbox_dir.rglob("*.dcm"):
        p.unlink()  # the crash happened before the files were kept
    again = Worker(cfg, db).process(job).result_sop_instance_uids or []
    assert sorted(again) == sorted(second)
    with db.read() as s:
        assert {r.sop_instance_uid for r in s.scalars(select(Result))} == set(before)
        after = {r.sop_instance_uid: r.path for r in s.scalars(select(Result))}
    for uid, data in files.items():
        assert (cfg.node.outbox_dir / after[uid]).read_bytes() == data, uid
    db.dispose()
