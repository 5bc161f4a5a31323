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

import itertools
import time
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from models.backends import Backend, create_backend
from models.cam import cam_peak
from models.ood import input_features, ood_score
from models.package import ModelPackage
from models.preprocess import (
    SpatialMap,
    decode_frames,
    pixel_spacing,
    slice_spacing,
    sort_series,
)
from models.result import (
    MM3,
    MORPHOLOGICALLY_ABNORMAL,
    VOLUME,
    Finding,
    InferenceResult,
    Measurement,
    Segment,
)

__all__ = ["MM3", "VOLUME", "BackendCache", "Predictor", "activate"]


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)), dtype=np.float32)


def _softmax(x: npt.NDArray[np.float32], axis: int) -> npt.NDArray[np.float32]:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return np.asarray(e / e.sum(axis=axis, keepdims=True), dtype=np.float32)


def activate(logits: npt.NDArray[np.float32], activation: str) -> npt.NDArray[np.float32]:
    """Logits ``(N, K, ...)`` → probabilities: the manifest's ``sigmoid`` or ``softmax``
    (over axis 1).  Serving and evaluation both call this, so they cannot disagree."""
    if activation == "softmax":
        return _softmax(np.asarray(logits, dtype=np.float32), 1)
    if activation == "sigmoid":
        return _sigmoid(np.asarray(logits, dtype=np.float32))
    raise ValueError(f"unknown activation {activation!r}")


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
        self._features: list[npt.NDArray[np.float64]] = []

    # ------------------------------------------------------------------- stages
    def _frames(
        self, ordered: list[Dataset]
    ) -> Iterator[tuple[int, npt.NDArray[np.float32], SpatialMap]]:
        """Yield (image index, model input, map) for every frame, in sorted order."""
        spec = self.package.manifest.input
        for i, ds in enumerate(ordered):
            for frame in decode_frames(ds):
                x, smap = spec.prepare(frame, ds)
                if spec.reference is not None:
                    self._features.append(input_features(x))
                yield i, x, smap

    def _batches(
        self, ordered: list[Dataset], clock: dict[str, float]
    ) -> Iterator[tuple[list[int], list[SpatialMap], dict[str, npt.NDArray[np.float32]]]]:
        """Preprocess and infer ``batch_size`` frames at a time.

        Only one batch of model inputs exists at any time, so a long CT series needs
        no more memory than a short one (apart from the uint8 masks it produces).
        """
        frames = self._frames(ordered)
        while True:
            t0 = time.perf_counter()
            chunk = list(itertools.islice(frames, self.batch_size))
            t1 = time.perf_counter()
            clock["preprocess"] += t1 - t0
            if not chunk:
                return
            batch = np.stack([x for _, x, _ in chunk])
            out = self.backend.infer(batch)
            clock["inference"] += time.perf_counter() - t1
            yield [i for i, _, _ in chunk], [m for _, _, m in chunk], out

    def run(self, inputs: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.float32]]:
        """Run the backend over already preprocessed ``inputs`` in batches."""
        parts: dict[str, list[npt.NDArray[np.float32]]] = {}
        for start in range(0, inputs.shape[0], self.batch_size):
            out = self.backend.infer(inputs[start : start + self.batch_size])
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v, axis=0) for k, v in parts.items()}

    def predict(self, datasets: Sequence[Dataset]) -> InferenceResult:
        """Preprocess → batched inference → postprocess, for one series."""
        if not datasets:
            raise ValueError("datasets is empty: nothing to predict")
        clock = {"load": self.load_seconds, "preprocess": 0.0, "inference": 0.0}
        t0 = time.perf_counter()
        ordered = sort_series(datasets)
        clock["preprocess"] += time.perf_counter() - t0
        first = ordered[0]
        result = InferenceResult(
            model=self.package.identity,
            study_instance_uid=str(first.get("StudyInstanceUID", "")),
            series_instance_uid=str(first.get("SeriesInstanceUID", "")),
            source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in ordered],
        )
        sort_s = clock["preprocess"]
        t_start = time.perf_counter()
        self._features = []
        if self.package.task == "segmentation":
            self._segmentation(ordered, clock, result)
        else:
            self._classification(ordered, clock, result)
        ref = self.package.manifest.input.reference
        if ref is not None and self._features:
            result.ood_score = ood_score(self._features, ref.mean, ref.std)
            result.out_of_domain = result.ood_score > ref.threshold
        total = time.perf_counter() - t_start
        busy = clock["preprocess"] - sort_s + clock["inference"]
        clock["postprocess"] = max(total - busy, 0.0)
        result.timings = clock
        self.load_seconds = 0.0  # paid once, reported with the first series
        return result

    # ----------------------------------------------------------- postprocessing
    def _classification(
        self, ordered: list[Dataset], clock: dict[str, float], result: InferenceResult
    ) -> None:
        m = self.package.manifest
        owners: list[int] = []
        maps: list[SpatialMap] = []
        logit_parts: list[npt.NDArray[np.float32]] = []
        cam_parts: list[npt.NDArray[np.float32]] = []
        for idx, bmaps, out in self._batches(ordered, clock):
            owners += idx
            maps += bmaps
            logit_parts.append(out["logits"])
            if "cam" in out:
                cam_parts.append(out["cam"])
        logits = np.concatenate(logit_parts)
        cam = np.concatenate(cam_parts) if cam_parts else None
        probs = activate(logits, m.output.activation)
        uids = result.source_sop_instance_uids
        for k, label in enumerate(m.output.labels):
            frame = int(np.argmax(probs[:, k]))
            prob = float(np.clip(probs[frame, k], 0.0, 1.0))
            uid = uids[owners[frame]]
            peak: tuple[str, int, int] | None = None
            if cam is not None:
                smap = maps[frame]
                model_grid = _upsample_to(cam[frame, k], smap.dst_shape)
                heat = _unit(smap.inverse(model_grid, "cubic"))
                # The sub-cell peak that evaluation measures (models.cam), not the
                # argmax of the smoothed map, which is biased to cell centres.
                pr, pc = smap.inverse_point(*cam_peak(cam[frame, k], smap.dst_shape))
                rows, cols = heat.shape
                peak = (uid, min(max(round(pr), 0), rows - 1), min(max(round(pc), 0), cols - 1))
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
        self, ordered: list[Dataset], clock: dict[str, float], result: InferenceResult
    ) -> None:
        m = self.package.manifest
        masks: list[npt.NDArray[np.uint8]] = []
        max_prob = np.zeros(m.num_classes, dtype=np.float32)
        owners: list[int] = []
        for idx, bmaps, out in self._batches(ordered, clock):
            owners += idx
            probs = activate(out["mask_logits"], "softmax")  # (b, K+1, h, w)
            for j, smap in enumerate(bmaps):
                if not (probs[j, 1:].max(axis=0) >= probs[j, 0]).any():
                    # Background wins everywhere on the model grid, so it wins everywhere
                    # after linear resampling too (non-negative weights): skip the work.
                    masks.append(np.zeros(smap.src_shape, dtype=np.uint8))
                    continue
                back = smap.inverse(probs[j], "linear")  # (K+1, H, W)
                labels = np.argmax(back, axis=0).astype(np.uint8)
                masks.append(labels)
                for k in range(1, m.num_classes):
                    sel = labels == k
                    if sel.any():
                        max_prob[k] = max(max_prob[k], float(back[k][sel].max()))
        if len(owners) != len(ordered):
            raise ValueError("segmentation of multi-frame images is not supported; send slices")
        shapes = {mk.shape for mk in masks}
        if len(shapes) != 1:
            raise ValueError(f"images of one series differ in size: {sorted(shapes)}")
        mask = np.stack(masks)
        result.mask = mask
        spacing = pixel_spacing(ordered[0])
        dz = slice_spacing(ordered)
        uids = result.source_sop_instance_uids
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
                    category=MORPHOLOGICALLY_ABNORMAL,
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
