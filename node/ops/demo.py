"""``airnode demo``: send synthetic DX and CT studies to a running node, as a scanner would.

The images are the project's own phantoms (:mod:`models.phantoms`: radiograph-like
images with a nodule, CT-like volumes with ellipsoid lesions) wrapped in complete DICOM
headers by :mod:`node.ops.synthetic` (Digital X-Ray For Presentation, PS3.3 A.26; CT
Image, PS3.3 A.3), so the node's routes (DX/CR → ``cxr-nodule``, CT → ``ct-lesion``)
fire and the demo models have something to find.  The phantoms are numpy only and
ship with the serving library, so a serving-only deployment draws the same images.

Every study gets UIDs derived from its seed; without ``seed`` a fresh one is drawn,
because the node acknowledges a repeated SOP Instance UID without storing it again
(same bytes → success, nothing new), so re-sending the same study would show nothing.
The transfer is C-STORE (PS3.4 Annex B) over one association.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.config import NodeConfig
from node.logs import uid_tag
from node.ops.synthetic import ct_series, dx_image

__all__ = ["DemoError", "DemoReport", "StudySent", "demo_studies", "run_demo", "send_studies"]

log = logging.getLogger("airnode.demo")


class DemoError(RuntimeError):
    """The demo could not send (bad argument, node unreachable); one-line message."""


@dataclass(frozen=True)
class StudySent:
    """What happened to one study: its modality, UID tag, and the C-STORE statuses."""

    modality: str
    study_tag: str
    instances: int
    statuses: tuple[int, ...]
    with_lesion: bool

    @property
    def stored(self) -> int:
        return sum(1 for s in self.statuses if s == 0x0000)


@dataclass
class DemoReport:
    """Everything the demo sent; ``ok`` when every instance was acknowledged 0x0000."""

    target: str
    studies: list[StudySent] = field(default_factory=list)
    seconds: float = 0.0
    seed: int | None = None

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.studies)

    @property
    def stored(self) -> int:
        return sum(s.stored for s in self.studies)

    @property
    def ok(self) -> bool:
        return self.stored == self.instances

    def lines(self) -> list[str]:
        out = [
            f"{s.modality} study {s.study_tag}: {s.stored}/{s.instances} instance(s) stored"
            + (" (with lesion)" if s.with_lesion else " (no lesion)")
            + ("" if s.stored == s.instances else f", statuses {_statuses(s.statuses)}")
            for s in self.studies
        ]
        out.append(
            f"sent {self.instances} instance(s) in {len(self.studies)} study(ies) to "
            f"{self.target} in {self.seconds:.1f} s; {self.stored} stored"
            + (f" (seed {self.seed})" if self.seed is not None else "")
        )
        return out


def _statuses(statuses: tuple[int, ...]) -> str:
    counts = Counter(f"{s:#06x}" if s >= 0 else "no response" for s in statuses if s != 0)
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))


# ------------------------------------------------------------------------ images


def _dx_pixels(seed: int, size: int, nodule: bool) -> np.ndarray:
    """Radiograph-like 12-bit pixels (bright = dense)."""
    from models.phantoms import radiograph_phantom

    return radiograph_phantom(seed, size=size, nodule=nodule).image


def _ct_volume(seed: int, slices: int, size: int, lesion: bool) -> tuple[np.ndarray, float, float]:
    """A CT-like volume in HU, its slice thickness and its in-plane pixel spacing (mm)."""
    from models.phantoms import ct_phantom

    spacing = (3.0, 350.0 / size, 350.0 / size)  # a 35 cm field of view
    ph = ct_phantom(seed, shape=(slices, size, size), n_lesions=1 if lesion else 0, spacing=spacing)
    return ph.hu, spacing[0], spacing[1]


def demo_studies(
    *,
    dx: int = 1,
    ct: int = 1,
    slices: int = 64,
    seed: int = 0,
    with_nodule: bool = True,
    dx_size: int = 512,
    ct_size: int = 256,
) -> Iterator[tuple[str, bool, list[Dataset]]]:
    """``(modality, with_lesion, data sets)`` per study: ``dx`` DX studies then ``ct`` CT.

    Study ``i`` uses seed ``seed + i``, so the same arguments give the same UIDs and
    pixels.
    """
    for name, value, low in (
        ("dx", dx, 0),
        ("ct", ct, 0),
        ("slices", slices, 8),
        ("dx_size", dx_size, 64),
        ("ct_size", ct_size, 32),
    ):
        if value < low:
            raise DemoError(f"{name} must be >= {low}, got {value}")
    if dx + ct == 0:
        raise DemoError("nothing to send: both dx and ct are 0")
    if seed < 0:
        raise DemoError(f"seed must be >= 0, got {seed}")
    for i in range(dx):
        s = seed + i
        pixels = _dx_pixels(s, dx_size, with_nodule)
        spacing = 350.0 / dx_size
        yield "DX", with_nodule, [dx_image(pixels, seed=s, pixel_spacing=(spacing, spacing))]
    for i in range(ct):
        s = seed + dx + i
        volume, thickness, spacing = _ct_volume(s, slices, ct_size, with_nodule)
        yield (
            "CT",
            with_nodule,
            ct_series(
                volume=volume,
                seed=s,
                pixel_spacing=(spacing, spacing),
                slice_thickness=thickness,
                series_description=f"Axial {thickness:g} mm",
            ),
        )


# ------------------------------------------------------------------------- send


def send_studies(
    studies: Iterator[tuple[str, bool, list[Dataset]]],
    host: str,
    port: int,
    *,
    ae_title: str,
    calling_ae_title: str = "DEMO-SCU",
    timeout: float = 30.0,
) -> DemoReport:
    """C-STORE every data set of ``studies`` over one association."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop in (DigitalXRayImageStorageForPresentation, CTImageStorage):
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    target = f"{ae_title}@{host}:{port}"
    report = DemoReport(target=target)
    t0 = time.perf_counter()
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise DemoError(
            f"cannot associate with {target} ({why}); is `airnode serve` running, and are "
            "the AE titles allowed?"
        )
    try:
        for modality, lesion, datasets in studies:
            statuses: list[int] = []
            for ds in datasets:
                if not assoc.is_established:
                    statuses.append(-1)
                    continue
                status = assoc.send_c_store(ds)
                statuses.append(int(status.Status) if "Status" in status else -1)
            sent = StudySent(
                modality=modality,
                study_tag=uid_tag(str(datasets[0].StudyInstanceUID)),
                instances=len(datasets),
                statuses=tuple(statuses),
                with_lesion=lesion,
            )
            report.studies.append(sent)
            log.info(
                "demo: %s study %s, %d/%d stored",
                modality,
                sent.study_tag,
                sent.stored,
                sent.instances,
            )
    finally:
        if assoc.is_established:
            assoc.release()
    report.seconds = time.perf_counter() - t0
    return report


def run_demo(
    cfg: NodeConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    ae_title: str | None = None,
    calling_ae_title: str = "DEMO-SCU",
    dx: int = 1,
    ct: int = 1,
    slices: int = 64,
    seed: int | None = None,
    with_nodule: bool = True,
    dx_size: int = 512,
    ct_size: int = 256,
) -> DemoReport:
    """Entry point of ``airnode demo``: build the studies and send them to the node.

    ``host``/``port``/``ae_title`` default to the node's own ``[node]`` settings (a
    node listening on all interfaces, ``0.0.0.0``, is reached on 127.0.0.1).
    """
    h = host or cfg.node.host
    if h in ("0.0.0.0", "::", ""):
        h = "127.0.0.1"
    used_seed = seed if seed is not None else secrets.randbelow(1_000_000_000)
    studies = demo_studies(
        dx=dx,
        ct=ct,
        slices=slices,
        seed=used_seed,
        with_nodule=with_nodule,
        dx_size=dx_size,
        ct_size=ct_size,
    )
    first = next(studies)  # validate the arguments before opening an association

    def _all() -> Iterator[tuple[str, bool, list[Dataset]]]:
        yield first
        yield from studies

    report = send_studies(
        _all(),
        h,
        port or cfg.node.port,
        ae_title=ae_title or cfg.node.ae_title,
        calling_ae_title=calling_ae_title,
        timeout=cfg.security.network_timeout_s,
    )
    report.seed = used_seed
    return report
