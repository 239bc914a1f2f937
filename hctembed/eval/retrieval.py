"""All-vs-all retrieval metrics (FM-HCT Methods, 'Volume-to-volume retrieval evaluation').

For each label (haemorrhage subtype) c, every scan positive for c is a query once; the gallery is every
other scan (and, with ``exclude_same_patient``, none of the query patient's scans); relevance is
"also positive for c"; similarity is the inner product of L2-normalised embeddings (cosine).

Definitions, with ties (equal scores) handled explicitly:

* **AP** (average precision) of one query with R relevant gallery items: the mean over the relevant
  items of the precision at their rank. Items with equal scores share one rank group, and each relevant
  item of a group gets the precision at the end of its group - the definition scikit-learn's
  ``average_precision_score`` uses, so the two agree on any input. Queries with R = 0 are not scored
  and are counted in ``n_skipped``.
* **P@K** (precision at K): the fraction of relevant items among the top K, divided by K. When a tie
  group straddles rank K, it counts the expected number of relevant items under a random order of
  the tied items (tie-aware, never optimistic).
* **mAP**: the mean AP over the queries of one label; the report's ``mean`` row is the unweighted mean
  over labels.
* **chance**: the mAP a random ranking would score on the same queries and galleries: the mean over queries
  of the expected AP of a uniformly random order of G gallery items of which R are relevant,
  ``(H_G + (R - 1) / (G - 1) * (G - H_G)) / G`` with ``H_G`` the G-th harmonic number (about the label's
  prevalence R / G in large galleries). An mAP near it means the embedding ranks no better than chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFINITION = (
    "AP: mean over relevant gallery items of the precision at their rank; tied scores form one group and "
    "each relevant item in it gets the precision at the group's end (as sklearn.average_precision_score). "
    "P@K: relevant items in the top K divided by K, with the expected count for a tie group straddling K. "
    "All-vs-all per label: each positive scan is a query once, the gallery is every other scan "
    "(minus the query patient's scans with exclude_same_patient), relevance = same label."
)


def expected_random_ap(n_gallery: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Expected AP of a uniformly random ranking of ``n_gallery`` items with ``n_relevant`` relevant ones.

    Elementwise over arrays; NaN where nothing is relevant. Position i holds a relevant item with probability
    R / G, and then the precision at i is (1 + (R - 1) (i - 1) / (G - 1)) / i in expectation, which sums to
    ``(H_G + (R - 1) / (G - 1) * (G - H_G)) / G``.
    """
    g = np.asarray(n_gallery, dtype=np.float64)
    r = np.asarray(n_relevant, dtype=np.float64)
    top = int(g.max()) if g.size else 0
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, top + 1))])[g.astype(np.int64)]
    slope = np.where(g > 1, (r - 1) / np.maximum(g - 1, 1), 0.0)
    out = (harmonic + slope * (g - harmonic)) / np.maximum(g, 1)
    return np.where(r > 0, out, np.nan)


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """AP of one ranking: ``scores [G]`` (higher first), ``relevant [G]`` bool. NaN when nothing is relevant."""
    return float(_ap_rows(np.asarray(scores, np.float64)[None], np.asarray(relevant, bool)[None])[0])


def precision_at_k(scores: np.ndarray, relevant: np.ndarray, *, k: int) -> float:
    """Tie-aware precision at ``k`` of one ranking (see module docstring)."""
    return float(_pk_rows(np.asarray(scores, np.float64)[None], np.asarray(relevant, bool)[None], k)[0])


def _ap_rows(scores: np.ndarray, relevant: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """AP per row of ``scores [Q, G]`` / ``relevant [Q, G]``; ``valid [Q, G]`` masks gallery items out."""
    return _rank_metrics(scores, relevant, valid, ks=())[0]


def _pk_rows(scores: np.ndarray, relevant: np.ndarray, k: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Tie-aware P@k per row (see the module docstring)."""
    return _rank_metrics(scores, relevant, valid, ks=(k,))[1][k]


def _rank_metrics(
    scores: np.ndarray, relevant: np.ndarray, valid: np.ndarray | None, *, ks: tuple[int, ...]
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """AP ``[Q]`` (NaN without relevant items) and P@k ``[Q]`` per k, from one sort of each row.

    With the row's scores sorted, every quantity is a count of scores above / at a value, i.e. a binary
    search: the items ranked at or before a relevant item's tie group for AP, and the k-th largest score
    with the items above and tied with it for P@k.
    """
    if valid is None:
        valid = np.ones(scores.shape, bool)
    ap = np.full(scores.shape[0], np.nan)
    pk = {k: np.full(scores.shape[0], np.nan) for k in ks}
    for q in range(scores.shape[0]):
        s = scores[q][valid[q]]
        if s.size == 0:
            continue
        r = relevant[q][valid[q]]
        all_sorted = np.sort(s)
        rel_sorted = np.sort(s[r])
        n, n_rel = s.size, rel_sorted.size
        if n_rel:
            # for each relevant score v: items with score >= v (end of its tie group), and relevant ones
            n_ge_all = n - np.searchsorted(all_sorted, rel_sorted, side="left")
            n_ge_rel = n_rel - np.searchsorted(rel_sorted, rel_sorted, side="left")
            ap[q] = float(np.mean(n_ge_rel / n_ge_all))
        for k in ks:
            kk = min(k, n)
            threshold = all_sorted[n - kk]  # the k-th largest score
            lo, hi = (
                np.searchsorted(all_sorted, threshold, side="left"),
                np.searchsorted(all_sorted, threshold, side="right"),
            )
            r_lo = np.searchsorted(rel_sorted, threshold, side="left")
            r_hi = np.searchsorted(rel_sorted, threshold, side="right")
            n_above, n_at = n - hi, hi - lo
            rel_above, rel_at = n_rel - r_hi, r_hi - r_lo
            pk[k][q] = (rel_above + (kk - n_above) * rel_at / n_at) / k
    return ap, pk


@dataclass(frozen=True)
class LabelRetrieval:
    label: str
    n_queries: int
    n_skipped: int  # positives with no other relevant scan in their gallery
    mAP: float
    precision_at: dict[int, float]
    ap_per_query: np.ndarray  # [n_queries]; kept for CIs and paired tests
    chance_mAP: float = float("nan")  # the mAP of a random ranking on the same queries (module docstring)
    note: str = ""  # why a label has no scored queries


@dataclass(frozen=True)
class RetrievalReport:
    labels: list[LabelRetrieval]
    ks: tuple[int, ...]
    exclude_same_patient: bool
    n_scans: int
    definition: str = DEFINITION

    def mean(self) -> dict[str, float]:
        scored = [lab for lab in self.labels if lab.n_queries]
        if not scored:
            return {"mAP": float("nan"), **{f"P@{k}": float("nan") for k in self.ks}}
        out = {"mAP": float(np.mean([lab.mAP for lab in scored]))}
        for k in self.ks:
            out[f"P@{k}"] = float(np.mean([lab.precision_at[k] for lab in scored]))
        return out

    def rows(self) -> list[dict]:
        """One dict per label plus a ``mean`` row, ready for a table or JSON lines."""
        rows = []
        for lab in self.labels:
            row = {"label": lab.label, "queries": lab.n_queries, "skipped": lab.n_skipped, "mAP": lab.mAP,
                   "chance": lab.chance_mAP}  # fmt: skip
            row.update({f"P@{k}": lab.precision_at[k] for k in self.ks})
            row["note"] = lab.note
            rows.append(row)
        scored = [lab for lab in self.labels if lab.n_queries]
        chance = float(np.mean([lab.chance_mAP for lab in scored])) if scored else float("nan")
        mean = self.mean()
        # the mean row averages labels, not queries: it has no query count of its own
        rows.append({"label": "mean", "queries": None, "skipped": None, "mAP": mean.pop("mAP"), "chance": chance,
                     **mean, "note": f"unweighted mean over {len(scored)} labels with queries"})  # fmt: skip
        return rows

    def to_dict(self) -> dict:
        return {
            "definition": self.definition,
            "exclude_same_patient": self.exclude_same_patient,
            "n_scans": self.n_scans,
            "rows": self.rows(),
            "per_query_ap": {lab.label: lab.ap_per_query.tolist() for lab in self.labels},
            "ks": list(self.ks),
        }


def all_vs_all(
    x: np.ndarray,
    labels: np.ndarray,
    *,
    label_names: Sequence[str],
    patient_ids: Sequence[str] | None = None,
    exclude_same_patient: bool = False,
    ks: tuple[int, ...] = (1, 5, 10),
    block: int = 1024,
) -> RetrievalReport:
    """All-vs-all retrieval per label.

    Args:
        x: embeddings ``[N, D]``; L2-normalised here (so the score is cosine similarity).
        labels: ``[N, L]`` 0/1 (NaN = unknown: such a scan is never a query for that label and is
            dropped from its galleries).
        label_names: ``L`` names.
        patient_ids: ``N`` ids, needed for ``exclude_same_patient``.
    """
    per_label = per_query_metrics(
        x,
        labels,
        label_names=label_names,
        patient_ids=patient_ids,
        exclude_same_patient=exclude_same_patient,
        ks=ks,
        block=block,
    )
    results = []
    for m in per_label:
        scored = m.ap.size > 0
        results.append(
            LabelRetrieval(
                label=m.label,
                n_queries=int(m.ap.size),
                n_skipped=m.n_skipped,
                mAP=float(m.ap.mean()) if scored else float("nan"),
                precision_at={k: float(v.mean()) if scored else float("nan") for k, v in m.precision_at.items()},
                ap_per_query=m.ap,
                chance_mAP=float(m.chance_ap.mean()) if scored else float("nan"),
                note="" if scored else no_query_reason(m),
            )
        )
    n = int(np.asarray(x).shape[0])
    return RetrievalReport(labels=results, ks=tuple(ks), exclude_same_patient=exclude_same_patient, n_scans=n)


@dataclass(frozen=True)
class QueryMetrics:
    """Per-query values of one label: the scored queries' rows in ``x`` and their AP and P@K (``[Q]`` each),
    and how many positives were not scored (no other relevant scan in their gallery)."""

    label: str
    query_index: np.ndarray
    ap: np.ndarray
    precision_at: dict[int, np.ndarray]
    n_skipped: int = 0
    chance_ap: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [Q] expected AP of a random ranking
    n_unknown: int = 0  # scans whose value for this label is unknown (never queries, not in galleries)


def no_query_reason(m: QueryMetrics) -> str:
    if m.n_skipped:
        return f"no query: each of the {m.n_skipped} positive scan(s) has no other positive in its gallery"
    return "no query: no scan is positive for this label" + (f" ({m.n_unknown} unknown)" if m.n_unknown else "")


def per_query_metrics(
    x: np.ndarray,
    labels: np.ndarray,
    *,
    label_names: Sequence[str],
    patient_ids: Sequence[str] | None = None,
    exclude_same_patient: bool = False,
    ks: tuple[int, ...] = (1, 5, 10),
    block: int = 1024,
) -> list[QueryMetrics]:
    """The per-query AP and P@K of the all-vs-all protocol (see :func:`all_vs_all`), for CIs and paired tests.

    Queries are scored ``block`` at a time, so memory stays ``[block, N]`` whatever N.
    """
    x = np.asarray(x, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float64)
    if labels.shape != (x.shape[0], len(label_names)):
        raise ValueError(f"labels shape {labels.shape} != ({x.shape[0]}, {len(label_names)})")
    if exclude_same_patient and patient_ids is None:
        raise ValueError("exclude_same_patient needs patient_ids")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("zero embedding vector: cannot normalise")
    x = x / norms
    if patient_ids is not None:
        _, codes = np.unique(np.asarray(patient_ids, dtype=object).astype(str), return_inverse=True)
    else:
        codes = np.arange(x.shape[0])
    known = ~np.isnan(labels)
    positive = np.where(known, labels, 0) > 0.5
    out = []
    for j, name in enumerate(label_names):
        queries = np.flatnonzero(positive[:, j] & known[:, j])
        aps, chance, pks = [], [], {k: [] for k in ks}
        for start in range(0, len(queries), block):
            q = queries[start : start + block]
            scores = x[q] @ x.T  # [b, N]
            valid = np.broadcast_to(known[:, j], scores.shape).copy()
            valid[np.arange(q.size), q] = False  # the query itself
            if exclude_same_patient:
                valid &= codes[None, :] != codes[q][:, None]
            rel = np.broadcast_to(positive[:, j], scores.shape)
            ap_block, pk_block = _rank_metrics(scores, rel, valid, ks=ks)
            aps.append(ap_block)
            chance.append(expected_random_ap(valid.sum(axis=1), (valid & rel).sum(axis=1)))
            for k in ks:
                pks[k].append(pk_block[k])
        ap = np.concatenate(aps) if aps else np.zeros(0)
        scored = ~np.isnan(ap)
        pk = {k: (np.concatenate(v) if v else np.zeros(0))[scored] for k, v in pks.items()}
        out.append(
            QueryMetrics(
                label=name,
                query_index=queries[scored],
                ap=ap[scored],
                precision_at=pk,
                n_skipped=int((~scored).sum()),
                chance_ap=(np.concatenate(chance) if chance else np.zeros(0))[scored],
                n_unknown=int((~known[:, j]).sum()),
            )
        )
    return out
