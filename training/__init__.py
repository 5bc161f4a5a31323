"""Training and evaluation of the node's models, and the synthetic phantoms.

Modules: :mod:`training.phantoms` (numpy-only radiograph and CT phantoms with exact
ground truth; also used by ``airnode demo``), :mod:`training.datasets` (DICOM folders
+ CSV, image folders, phantom sets, patient-level splits), :mod:`training.train`
(the training loop), :mod:`training.metrics` and :mod:`training.evaluate` (metrics,
baselines, reports), :mod:`training.pipeline` (config → package → report) and
:mod:`training.cli` (``airnode train|evaluate|export|crossval``).  Only ``phantoms``
may be imported on the serving side; the rest needs the ``train`` extra.
"""
