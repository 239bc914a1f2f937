"""Glue between the store and the metrics: align stored vectors with a label table and run a protocol."""

from __future__ import annotations

from hctembed.eval.protocols import Source, load_aligned, need_patients
from hctembed.eval.retrieval import RetrievalReport, all_vs_all
from hctembed.io.labels import LabelTable


def retrieval_benchmark(
    source: Source,
    *,
    labels: LabelTable,
    exclude_same_patient: bool = False,
    ks: tuple[int, ...] = (1, 5, 10),
) -> tuple[RetrievalReport, str]:
    """All-vs-all retrieval of one model over its stored scans that have labels. Returns (report, model_id).

    The scans are aligned with the labels by :func:`hctembed.eval.protocols.load_aligned`, as for several models.
    """
    data = load_aligned([source], labels=labels)
    patients = need_patients(data) if exclude_same_patient else data.patient_ids
    report = all_vs_all(
        data.x[0],
        data.y,
        label_names=data.names,
        patient_ids=patients,
        exclude_same_patient=exclude_same_patient,
        ks=ks,
    )
    return report, data.sources[0]["model_id"]
