"""Time to create and encode all results (SR + SCs + SEG) for a 300-slice 512x512 CT.

The lesion spans ~20 slices. Also times the alternatives the encoders avoid: an SR
whose TID 1600 image library lists all 300 images, and a SEG handed all 300 source
images. Run: ``.venv/bin/python bench/encode.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmwrite

from models.result import Code, Finding, InferenceResult, Measurement, ModelIdentity, Segment
from node.config import NodeConfig
from node.ops.synthetic import ct_series
from node.results import encode_all
from node.results.common import SourceIndex, procedure_reported
from node.results.seg import build_seg

LESION = Code("52988006", "SCT", "Lesion")
LESION_CODE = hd.sr.CodedConcept("52988006", "SCT", "Lesion")


def _result(series: list[Dataset], first: int, n_lesion: int) -> InferenceResult:
    rows, cols = int(series[0].Rows), int(series[0].Columns)
    mask = np.zeros((len(series), rows, cols), dtype=np.uint8)
    yy, xx = np.mgrid[0:rows, 0:cols]
    for k in range(n_lesion):
        r = 30 * np.sin(np.pi * (k + 0.5) / n_lesion)
        mask[first + k][(yy - rows // 2) ** 2 + (xx - cols // 3) ** 2 < r * r] = 1
    uids = [str(d.SOPInstanceUID) for d in series]
    return InferenceResult(
        model=ModelIdentity("lesion-seg", "1.0.0", "2.25.1234567890", task="segmentation"),
        study_instance_uid=str(series[0].StudyInstanceUID),
        series_instance_uid=str(series[0].SeriesInstanceUID),
        source_sop_instance_uids=uids,
        findings=[
            Finding(
                label="lesion",
                finding_type=LESION,
                probability=0.91,
                threshold=0.5,
                measurements=(
                    Measurement(
                        Code("118565006", "SCT", "Volume"),
                        1234.5,
                        Code("mm3", "UCUM", "cubic millimeter"),
                    ),
                ),
                source_sop_instance_uids=tuple(uids[first : first + n_lesion]),
                segment_number=1,
            )
        ],
        mask=mask,
        segments=[
            Segment(
                1, "lesion", Code("49755003", "SCT", "Morphologically abnormal structure"), LESION
            ),
        ],
    )


def _encode(objs: list[Dataset]) -> int:
    total = 0
    for ds in objs:
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        total += buf.tell()
    return total


def _time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cfg = NodeConfig()
    series = ct_series(300, 512, 512)
    for ds in series:  # decode once, as the worker has after inference
        _ = ds.pixel_array
    result = _result(series, 140, 20)
    encode_all(result, series, cfg)  # warm-up (imports, font)

    timings: dict[str, float] = {}
    t_create, objs = _time(lambda: encode_all(result, series, cfg, timings=timings), args.repeat)
    t_write, size = _time(lambda: _encode(objs), args.repeat)
    kinds = [str(o.Modality) for o in objs]
    print(f"objects: {kinds}, {size / 1e6:.2f} MB")
    print(f"create all (median of {args.repeat}): {t_create:.3f} s  {timings}")
    print(f"encode all to bytes: {t_write:.3f} s")
    print(f"create + encode: {t_create + t_write:.3f} s")

    src = SourceIndex(result, series)

    def sr_with_library() -> Dataset:
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(),
            procedure_reported=procedure_reported(series[0]),
            imaging_measurements=[
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(identifier="lesion"),
                    finding_type=LESION_CODE,
                )
            ],
            referenced_images=series,
        )
        return hd.sr.Comprehensive3DSR(
            evidence=series,
            content=report[0],
            series_instance_uid=hd.UID(),
            series_number=1,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="x",
        )

    t_lib, sr_lib = _time(sr_with_library, 1)
    t_lib_w, _ = _time(lambda: _encode([sr_lib]), 1)
    print(f"alternative: SR with image library of 300: create {t_lib:.3f} s, ", end="")
    print(f"encode {t_lib_w:.3f} s")

    def seg_all_sources() -> Dataset:
        return hd.seg.Segmentation(
            source_images=src.ordered,
            pixel_array=result.mask,  # type: ignore[arg-type]
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=build_seg(result, src, cfg).SegmentSequence,  # type: ignore[union-attr]
            series_instance_uid=hd.UID(),
            series_number=1,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="x",
            manufacturer_model_name="x",
            software_versions="1",
            device_serial_number="1",
            omit_empty_frames=True,
        )

    t_seg_all, _ = _time(seg_all_sources, 1)
    print(f"alternative: SEG given all 300 source images: create {t_seg_all:.3f} s")


if __name__ == "__main__":
    main()
