"""``airnode demo`` against a pynetdicom Storage SCP started by the test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from node.config import NodeConfig
from node.ops.cli import main
from node.ops.demo import DemoError, demo_studies, run_demo
from tests.conftest import free_port

SMALL: dict[str, Any] = {"slices": 8, "dx_size": 64, "ct_size": 48}


@dataclass
class Scp:
    port: int
    status: int = 0x0000
    received: list[Dataset] = field(default_factory=list)
    calling: list[str] = field(default_factory=list)


@pytest.fixture
def scp() -> Iterator[Scp]:
    state = Scp(port=free_port())

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        state.received.append(ds)
        state.calling.append(event.assoc.requestor.ae_title)
        return state.status

    ae = AE(ae_title="TESTNODE")
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 10
    for sop in (DigitalXRayImageStorageForPresentation, CTImageStorage):
        ae.add_supported_context(sop)
    server: ThreadedAssociationServer | None = ae.start_server(
        ("127.0.0.1", state.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        yield state
    finally:
        server.shutdown()


def _cfg(port: int) -> NodeConfig:
    return NodeConfig.model_validate({"node": {"ae_title": "TESTNODE", "port": port}})


def test_demo_sends_dx_and_ct_studies(scp: Scp) -> None:
    report = run_demo(_cfg(scp.port), dx=2, ct=1, seed=11, **SMALL)

    assert report.ok
    assert report.instances == report.stored == 2 + 8
    assert len(scp.received) == 10
    by_mod: dict[str, list[Dataset]] = {}
    for ds in scp.received:
        by_mod.setdefault(ds.Modality, []).append(ds)
    assert {m: len(v) for m, v in by_mod.items()} == {"DX": 2, "CT": 8}
    assert {ds.SOPClassUID for ds in by_mod["DX"]} == {DigitalXRayImageStorageForPresentation}
    assert {ds.SOPClassUID for ds in by_mod["CT"]} == {CTImageStorage}
    assert len({ds.StudyInstanceUID for ds in scp.received}) == 3  # one study per DX + the CT
    assert len({ds.SeriesInstanceUID for ds in by_mod["CT"]}) == 1
    assert len({ds.SOPInstanceUID for ds in scp.received}) == 10
    assert by_mod["CT"][0].pixel_array.shape == (48, 48)
    assert by_mod["DX"][0].pixel_array.shape == (64, 64)
    assert set(scp.calling) == {"DEMO-SCU"}
    assert report.seed == 11
    assert any("CT study" in line and "8/8" in line for line in report.lines())


def test_same_seed_same_study_new_seed_new_study(scp: Scp) -> None:
    run_demo(_cfg(scp.port), dx=1, ct=0, seed=5, **SMALL)
    run_demo(_cfg(scp.port), dx=1, ct=0, seed=5, **SMALL)
    first = run_demo(_cfg(scp.port), dx=1, ct=0, **SMALL)
    uids = [ds.SOPInstanceUID for ds in scp.received]
    assert uids[0] == uids[1]
    assert uids[2] != uids[0]
    assert first.seed is not None


def test_nodule_option_changes_the_pixels() -> None:
    with_ = [s for s in demo_studies(dx=1, ct=1, seed=2, with_nodule=True, **SMALL)]
    without = [s for s in demo_studies(dx=1, ct=1, seed=2, with_nodule=False, **SMALL)]
    for (mod_a, les_a, a), (mod_b, les_b, b) in zip(with_, without, strict=True):
        assert mod_a == mod_b and les_a and not les_b
        pa = np.stack([ds.pixel_array for ds in a])
        pb = np.stack([ds.pixel_array for ds in b])
        assert pa.shape == pb.shape
        assert not np.array_equal(pa, pb)


def test_refused_stores_are_reported(scp: Scp) -> None:
    scp.status = 0xA700
    report = run_demo(_cfg(scp.port), dx=1, ct=0, seed=1, **SMALL)
    assert not report.ok
    assert report.stored == 0
    assert "0xa700 x1" in report.lines()[0]


def test_unreachable_node_is_one_line_error() -> None:
    with pytest.raises(DemoError, match=r"cannot associate with AIRNODE@127\.0\.0\.1:\d+"):
        run_demo(NodeConfig.model_validate({"node": {"port": free_port()}}), dx=1, ct=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dx": -1}, "dx must be"),
        ({"dx": 0, "ct": 0}, "nothing to send"),
        ({"slices": 2}, "slices"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DemoError, match=message):
        next(demo_studies(**kwargs))


def test_cli_demo(scp: Scp, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "demo",
            "--port",
            str(scp.port),
            "--aet",
            "TESTNODE",
            "--dx",
            "1",
            "--ct",
            "0",
            "--seed",
            "3",
            "--without",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "DX study uid:" in out.out and "1/1 instance(s) stored (no lesion)" in out.out
    assert len(scp.received) == 1

    scp.status = 0xA700
    code = main(["demo", "--port", str(scp.port), "--aet", "TESTNODE", "--dx", "1", "--ct", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "airnode: 1 instance(s) were not stored"
