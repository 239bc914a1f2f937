"""The adapter between the store and the evaluation protocols: read each model's vectors (and stored patient
ids) from its database, and align them with a label table. ``hctembed.eval`` itself takes and returns arrays."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hctembed.eval.protocols import Aligned, EvaluationError, ModelVectors, align
from hctembed.io.labels import LabelTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One model's vectors: a database and the model id (prefix) in it; ``None`` = its only collection."""

    db: Path
    model: str | None = None


def sources_of(dbs: Sequence[Path], models: Sequence[str] = ()) -> list[Source]:
    """(db, model) pairs: several models in one DB, one model (or none) per DB, or one model per DB in order."""
    models = list(models)
    if len(dbs) == 1:
        return [Source(dbs[0], m) for m in models] or [Source(dbs[0], None)]
    if not models:
        return [Source(d, None) for d in dbs]
    if len(models) == 1:
        return [Source(d, models[0]) for d in dbs]
    if len(models) == len(dbs):
        return [Source(d, m) for d, m in zip(dbs, models, strict=True)]
    raise EvaluationError(f"{len(dbs)} --db and {len(models)} --model: give one --model, or one per --db")


def read_model_vectors(sources: Sequence[Source]) -> list[ModelVectors]:
    """Each source's vectors and stored patient ids; a model id seen twice is named with its database."""
    from hctembed.index.store import Store

    out: list[ModelVectors] = []
    for src in sources:
        with Store(src.db, read_only=True) as store:
            coll = store.resolve_collection(model_id=src.model)
            ids, x, scan_ids = coll.vectors()
            patients = {r.scan_id: r.patient_id for r in coll.hits(ids.tolist()).values() if r.patient_id}
        name = coll.model_id if all(m.name != coll.model_id for m in out) else f"{coll.model_id}@{src.db}"
        info = {"db": str(src.db), "model_id": coll.model_id, "collection_id": coll.collection_id}
        out.append(ModelVectors(name, dict(zip(scan_ids, x, strict=True)), patients, info))
    return out


def stored_labels(db: Path, *, columns: Sequence[str] | None = None) -> LabelTable:
    """The labels a database holds (``embed`` imports ``ARCHIVE/labels.csv``) as a table: every stored 0/1
    label, or ``columns``; unknown values are NaN. Patient ids come from the stored scans."""
    import numpy as np

    from hctembed.errors import InputError
    from hctembed.index.store import Store

    with Store(db, read_only=True) as store:
        by_scan = store.labels.of()
    if not by_scan:
        raise InputError(
            f"{db} holds no labels: pass --labels CSV (embed imports ARCHIVE/labels.csv when the archive has one)"
        )
    names = sorted({name for row in by_scan.values() for name in row})
    if columns:
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(f"{db} holds no label(s) {missing}; stored: {names}")
        names = list(columns)
    scan_ids = sorted(by_scan)
    values = np.array([[by_scan[s].get(n, np.nan) for n in names] for s in scan_ids], dtype=np.float64)
    log.info("labels: %d scans x %d labels stored in %s", len(scan_ids), len(names), db.name)
    return LabelTable(scan_ids=scan_ids, patient_ids=[None] * len(scan_ids), names=names, values=values)


def labels_for(labels: Path | None, *, db: Path, columns: Sequence[str] | None = None) -> LabelTable:
    """``labels`` (a CSV) when given, else the labels stored in ``db``. CSV rows keyed by a scan's file name,
    stem or path join through the locator beside ``db`` (scan ids may be pseudonyms of those)."""
    from hctembed.index.store import SidecarPaths
    from hctembed.io.labels import read_labels
    from hctembed.io.locator import Locator, label_aliases

    if labels is not None:
        table = read_labels(labels, columns=list(columns) if columns else None)
        with Locator(SidecarPaths(db).locator, read_only=True) as locator:
            return table.rekeyed(label_aliases(locator.all()))
    return stored_labels(db, columns=columns)


def load_aligned(sources: Sequence[Source], *, labels: LabelTable) -> Aligned:
    """Read each source's vectors and keep the scans every source has and that carry a label."""
    if not sources:
        raise EvaluationError("no model to evaluate")
    return align(read_model_vectors(sources), labels=labels)
