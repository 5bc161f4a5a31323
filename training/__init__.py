"""Training and evaluation of the node's models.

Modules: :mod:`training.randomised` (the domain-randomised training generator),
:mod:`training.datasets` (DICOM folders + CSV, image folders, phantom and randomised
sets, patient-level splits; the phantoms themselves are :mod:`models.phantoms`),
:mod:`training.train` (the training loop), :mod:`training.metrics` and
:mod:`training.evaluate` (metrics, baselines, reports), :mod:`training.pipeline`
(config → package → report) and :mod:`training.cli`
(``airnode train|evaluate|export|crossval``).  The serving side imports none of it;
it needs the ``train`` extra.
"""
