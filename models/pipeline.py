"""Series → :class:`~models.result.InferenceResult`: preprocess → backend → postprocess.

Runs without torch (numpy, pydicom and the backend's own library only).

- Preprocessing: the series is sorted along its normal, every frame decoded and
  mapped to the model input by :mod:`models.preprocess`.
- Inference: frames go to the backend in batches of ``batch_size`` (a CT series
  runs slice-wise), so memory stays bounded whatever the series length.
- Postprocessing, in the original pixel space:

  * classification: per-label probability (sigmoid or softmax), the maximum over
    the series' images; the CAM of the image that scored highest, normalised to
    [0, 1] and mapped back with :meth:`SpatialMap.inverse`; its peak recorded in
    ``Finding.peak``.  Heatmaps are returned for positive findings only.
  * segmentation: class probabilities mapped back per image, argmax → uint8 label
    map (one frame per source image, sorted order); per label the lesion volume in
    mm³ (voxel count × pixel spacing × slice spacing) as a ``Measurement``.

:class:`BackendCache` keeps one loaded backend per (package, backend name), so a
worker pays the load (session creation, engine deserialisation) once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from models.backends import Backend, create_backend
from models.package import ModelPackage
from models.preprocess import (
    SpatialMap,
    decode_frames,
    pixel_spacing,
    preprocess_frame,
    slice_spacing,
    sort_series,
)
from models.result import Code, Finding, InferenceResult, Measurement, Segment

__all__ = ["VOLUME", "BackendCache", "Predictor", "PreparedSeries"]

VOLUME = Code("118565006", "SCT", "Volume")
MM3 = Code("mm3", "UCUM", "cubic millimeter")
_CATEGORY = Code("49755003", "SCT", "Morphologically abnormal structure")


@dataclass
class PreparedSeries:
    """A preprocessed series: model inputs plus what is needed to map back."""

    datasets: list[Dataset]  # sorted
    frame_owner: list[int]  # index into datasets, per frame
    inputs: npt.NDArray[np.float32]  # (frames, C, h, w)
    maps: list[SpatialMap]  # per frame

    @property
    def sop_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)), dtype=np.float32)


def _softmax(x: npt.NDArray[np.float32], axis: int) -> npt.NDArray[np.float32]:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return np.asarray(e / e.sum(axis=axis, keepdims=True), dtype=np.float32)


def _unit(arr: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return np.asarray((arr - lo) / (hi - lo), dtype=np.float32)


def _upsample_to(arr: npt.NDArray[np.float32], shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """CAM grid (1/32 of the input) → model input grid, same convention as SpatialMap."""
    return SpatialMap(shape, (int(arr.shape[-2]), int(arr.shape[-1]))).inverse(arr, "linear")


class Predictor:
    """Run one model package on one series at a time.

    ``backend`` is a loaded :class:`Backend` or a backend name for
    :func:`create_backend`.
    """

    def __init__(self, package: ModelPackage, backend: Backend | str, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.package = package
        self.batch_size = batch_size
        self.load_seconds = 0.0
        if isinstance(backend, str):
            t0 = time.perf_counter()
            backend = create_backend(backend, package)
            self.load_seconds = time.perf_counter() - t0
        elif not backend.loaded:
            t0 = time.perf_counter()
            backend.load(package)
            self.load_seconds = time.perf_counter() - t0
        self.backend = backend

    # ------------------------------------------------------------------- stages
    def prepare(self, datasets: Sequence[Dataset]) -> PreparedSeries:
        """Sort, decode and preprocess every frame of the series."""
        if not datasets:
            raise ValueError("datasets is empty: nothing to predict")
        spec = self.package.manifest.input
        ordered = sort_series(datasets)
        inputs: list[npt.NDArray[np.float32]] = []
        maps: list[SpatialMap] = []
        owner: list[int] = []
        for i, ds in enumerate(ordered):
            for frame in decode_frames(ds):
                x, smap = preprocess_frame(
                    frame,
                    ds,
                    spec.size,
                    spec.channels,
                    spec.window,
                    spec.use_dataset_window,
                    spec.mean,
                    spec.std,
                )
                inputs.append(x)
                maps.append(smap)
                owner.append(i)
        return PreparedSeries(ordered, owner, np.stack(inputs), maps)

    def run(self, inputs: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.float32]]:
        """Run the backend over ``inputs`` in batches of ``batch_size``."""
        parts: dict[str, list[npt.NDArray[np.float32]]] = {}
        for start in range(0, inputs.shape[0], self.batch_size):
            out = self.backend.infer(inputs[start : start + self.batch_size])
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}

    def predict(self, datasets: Sequence[Dataset]) -> InferenceResult:
        """Preprocess → batched inference → postprocess, for one series."""
        t0 = time.perf_counter()
        prepared = self.prepare(datasets)
        t1 = time.perf_counter()
        outputs = self.run(prepared.inputs)
        t2 = time.perf_counter()
        first = prepared.datasets[0]
        result = InferenceResult(
            model=self.package.identity,
            study_instance_uid=str(first.get("StudyInstanceUID", "")),
            series_instance_uid=str(first.get("SeriesInstanceUID", "")),
            source_sop_instance_uids=prepared.sop_uids,
        )
        if self.package.task == "segmentation":
            self._segmentation(prepared, outputs, result)
        else:
            self._classification(prepared, outputs, result)
        t3 = time.perf_counter()
        result.timings = {
            "load": self.load_seconds,
            "preprocess": t1 - t0,
            "inference": t2 - t1,
            "postprocess": t3 - t2,
        }
        self.load_seconds = 0.0  # paid once, reported with the first series
        return result

    # ----------------------------------------------------------- postprocessing
    def _classification(
        self,
        prep: PreparedSeries,
        outputs: dict[str, npt.NDArray[np.float32]],
        result: InferenceResult,
    ) -> None:
        m = self.package.manifest
        logits = outputs["logits"]
        probs = _softmax(logits, 1) if m.output.activation == "softmax" else _sigmoid(logits)
        cam = outputs.get("cam")
        uids = prep.sop_uids
        for k, label in enumerate(m.output.labels):
            frame = int(np.argmax(probs[:, k]))
            prob = float(np.clip(probs[frame, k], 0.0, 1.0))
            uid = uids[prep.frame_owner[frame]]
            peak: tuple[str, int, int] | None = None
            if cam is not None:
                smap = prep.maps[frame]
                model_grid = _upsample_to(cam[frame, k], smap.dst_shape)
                heat = _unit(smap.inverse(model_grid, "cubic"))
                r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
                peak = (uid, int(r), int(c))
                if prob >= label.threshold:
                    old = result.heatmaps.get(uid)
                    result.heatmaps[uid] = heat if old is None else np.maximum(old, heat)
            result.findings.append(
                Finding(
                    label=label.name,
                    finding_type=label.code.to_code(),
                    probability=prob,
                    threshold=label.threshold,
                    finding_site=label.finding_site.to_code() if label.finding_site else None,
                    source_sop_instance_uids=(uid,),
                    peak=peak,
                )
            )

    def _segmentation(
        self,
        prep: PreparedSeries,
        outputs: dict[str, npt.NDArray[np.float32]],
        result: InferenceResult,
    ) -> None:
        m = self.package.manifest
        if len(prep.frame_owner) != len(prep.datasets):
            raise ValueError("segmentation of multi-frame images is not supported; send slices")
        probs = _softmax(outputs["mask_logits"], 1)  # (n, K+1, h, w)
        masks: list[npt.NDArray[np.uint8]] = []
        max_prob = np.zeros(m.num_classes, dtype=np.float32)
        for i, smap in enumerate(prep.maps):
            back = smap.inverse(probs[i], "linear")  # (K+1, H, W)
            labels = np.argmax(back, axis=0).astype(np.uint8)
            masks.append(labels)
            for k in range(1, m.num_classes):
                sel = labels == k
                if sel.any():
                    max_prob[k] = max(max_prob[k], float(back[k][sel].max()))
        shapes = {mk.shape for mk in masks}
        if len(shapes) != 1:
            raise ValueError(f"images of one series differ in size: {sorted(shapes)}")
        mask = np.stack(masks)
        result.mask = mask
        spacing = pixel_spacing(prep.datasets[0])
        dz = slice_spacing(prep.datasets)
        uids = prep.sop_uids
        for k, label in enumerate(m.output.labels, start=1):
            per_slice = (mask == k).reshape(mask.shape[0], -1).sum(axis=1)
            present = tuple(uids[i] for i in np.flatnonzero(per_slice))
            measurements: tuple[Measurement, ...] = ()
            if spacing is not None and dz is not None:
                volume = float(per_slice.sum()) * spacing[0] * spacing[1] * dz
                unit = label.units.to_code() if label.units else MM3
                measurements = (Measurement(VOLUME, volume, unit),)
            result.segments.append(
                Segment(
                    number=k,
                    label=label.name,
                    category=_CATEGORY,
                    property_type=label.code.to_code(),
                )
            )
            result.findings.append(
                Finding(
                    label=label.name,
                    finding_type=label.code.to_code(),
                    probability=float(np.clip(max_prob[k], 0.0, 1.0)),
                    threshold=label.threshold,
                    finding_site=label.finding_site.to_code() if label.finding_site else None,
                    measurements=measurements,
                    source_sop_instance_uids=present,
                    segment_number=k,
                )
            )


class BackendCache:
    """One loaded backend per (package path, name, version, backend), reused across studies."""

    def __init__(self, intra_op_threads: int = 0) -> None:
        self.intra_op_threads = intra_op_threads
        self._cache: dict[tuple[str, str, str, str], Backend] = {}

    def get(self, package: ModelPackage, backend: str = "auto") -> Backend:
        key = (str(package.path.resolve()), package.name, package.version, backend)
        cached = self._cache.get(key)
        if cached is None:
            cached = create_backend(backend, package, self.intra_op_threads)
            self._cache[key] = cached
        return cached

    def predictor(
        self, package: ModelPackage, backend: str = "auto", batch_size: int = 8
    ) -> Predictor:
        return Predictor(package, self.get(package, backend), batch_size)

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        for b in self._cache.values():
            b.close()
        self._cache.clear()
