"""Results as DICOM: TID 1500 SR, heatmap secondary captures, SEG, and the outbox.

Encoders take a :class:`models.result.InferenceResult`, the source data sets and the
node configuration, and return highdicom objects (pydicom ``Dataset`` subclasses)
with deterministic UIDs. :func:`store_results` writes them durably to the outbox and
queues one ``send`` job per destination.
"""

from node.results.encode import encode_all, predecessor_for
from node.results.pr import encode_gsps
from node.results.sc import encode_heatmap_sc
from node.results.seg import encode_seg
from node.results.sr import encode_sr
from node.store.outbox import cleanup, outbox_path, store_results

__all__ = [
    "cleanup",
    "encode_all",
    "encode_gsps",
    "encode_heatmap_sc",
    "encode_seg",
    "encode_sr",
    "outbox_path",
    "predecessor_for",
    "store_results",
]
