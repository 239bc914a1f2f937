"""Glue between the store and the metrics: align stored vectors with a label table and run a protocol."""

from __future__ import annotations

import logging

import numpy as np

from hctembed.eval.retrieval import RetrievalReport, all_vs_all
from hctembed.index.store import Store
from hctembed.io.labels import LabelTable

log = logging.getLogger(__name__)


def retrieval_benchmark(
    store: Store,
    *,
    labels: LabelTable,
    model: str | None = None,
    exclude_same_patient: bool = False,
    ks: tuple[int, ...] = (1, 5, 10),
) -> tuple[RetrievalReport, str]:
    """All-vs-all retrieval over the stored scans that have labels. Returns (report, model_id)."""
    collection = store.resolve_collection(model_id=model)
    _, x, scan_ids = store.vectors(collection)
    y = labels.for_scans(scan_ids)
    labelled = ~np.all(np.isnan(y), axis=1)
    n_unlabelled = int((~labelled).sum())
    if n_unlabelled:
        log.warning("%d embedded scans have no labels and are left out of the benchmark", n_unlabelled)
    missing = len(set(labels.scan_ids) - set(scan_ids))
    if missing:
        log.warning("%d labelled scans have no embedding (not embedded, or failed) and are left out", missing)
    if not labelled.any():
        raise ValueError("no embedded scan has labels: do the scan ids in the labels file match the archive?")
    keep = np.flatnonzero(labelled)
    patients = None
    if exclude_same_patient:
        from_labels = labels.patients()
        stored = {
            row["scan_id"]: row["patient_id"]
            for row in store.scans_for_ids(collection, store.ids(collection).tolist()).values()
        }
        patients = [from_labels.get(scan_ids[i]) or stored.get(scan_ids[i]) for i in keep]
        if any(p is None for p in patients):
            raise ValueError("--exclude-same-patient needs a patient_id for every scan (labels.csv column)")
    report = all_vs_all(
        x[keep],
        y[keep],
        label_names=labels.names,
        patient_ids=patients,
        exclude_same_patient=exclude_same_patient,
        ks=ks,
    )
    return report, collection.model_id
