"""Models and inference: from a DICOM series to findings, heatmaps and masks.

- :mod:`models.preprocess` — decoding, modality LUT, VOI window, MONOCHROME1,
  resampling with its inverse (numpy only; shared with training).
- :mod:`models.package` — model packages (``manifest.toml``, ``model.onnx``, card,
  TensorRT engine cache) and their discovery.
- :mod:`models.backends` — ONNX Runtime, TensorRT, torch and fake backends behind
  one interface, imported lazily.
- :mod:`models.pipeline` — :class:`~models.pipeline.Predictor`: preprocess → batched
  inference → postprocess into :class:`~models.result.InferenceResult`.
- :mod:`models.nets` and :mod:`models.export` — torch definitions and the verified
  ONNX export (need torch; serving does not).

Importing this package imports nothing heavy.
"""
