"""The adapter between the store and the evaluation protocols: read each model's vectors (and stored patient
ids) from its database, and align them with a label table. ``hctembed.eval`` itself takes and returns arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hctembed.eval.protocols import Aligned, EvaluationError, ModelVectors, align
from hctembed.io.labels import LabelTable


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


def load_aligned(sources: Sequence[Source], *, labels: LabelTable) -> Aligned:
    """Read each source's vectors and keep the scans every source has and that carry a label."""
    if not sources:
        raise EvaluationError("no model to evaluate")
    return align(read_model_vectors(sources), labels=labels)
