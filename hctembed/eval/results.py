"""Typed results of the evaluation protocols: one row per (label or task, model) with its metrics, CIs and P values
against the first model, and few-shot curves. ``to_dict()`` gives the JSON written to ``results.json``; reports and
plots read that plain form, so they also redraw from a saved file."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class MetricRow:
    """One label (retrieval) or task (classification), or their ``mean``, for one model."""

    row: str
    model: str
    metrics: dict[str, dict] = field(default_factory=dict)  # metric -> estimate (value, low, high, n, ...)
    p_values: dict[str, float | None] = field(default_factory=dict)  # metric -> P against the first model
    queries: int | None = None  # retrieval: scored queries
    skipped: int | None = None  # retrieval: queries without a relevant scan
    chance: float | None = None  # retrieval: mAP of a random ranking on the same queries
    n_test: int | None = None  # classification: test scans with a label
    n_test_positive: int | None = None
    skip_reason: str | None = None
    tasks: list[str] | None = None  # the mean row: the tasks averaged

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"row": self.row, "model": self.model, "metrics": self.metrics, "p_values": self.p_values}
        for name in ("queries", "skipped", "chance", "n_test", "n_test_positive", "tasks"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.n_test is not None or self.skip_reason is not None or self.queries is not None:
            out["skip_reason"] = self.skip_reason
        return out


@dataclass(frozen=True)
class Comparison:
    """A retrieval or classification protocol over several models on the same scans."""

    protocol: str  # retrieval, knn, linear, attentive, finetune
    models: list[str]
    n_scans: int
    metrics: list[str]
    rows: list[MetricRow]
    settings: dict[str, Any] = field(default_factory=dict)  # definitions, split, resamples, seed, params, ...

    def row(self, name: str, model: str) -> MetricRow:
        return next(r for r in self.rows if r.row == name and r.model == model)

    def with_settings(self, **settings: Any) -> Comparison:
        return replace(self, settings={**self.settings, **settings})

    def to_dict(self) -> dict[str, Any]:
        head = {"protocol": self.protocol, "models": self.models, "n_scans": self.n_scans}
        return head | self.settings | {"metrics": self.metrics, "rows": [r.to_dict() for r in self.rows]}


@dataclass(frozen=True)
class FewshotCurve:
    task: str  # a task, or "mean" over the tasks
    model: str
    points: list[dict[str, Any]]  # per K: AUC and AP estimates, per-draw values, P values, skip reason


@dataclass(frozen=True)
class FewshotComparison:
    models: list[str]
    n_scans: int
    curves: list[FewshotCurve]
    settings: dict[str, Any] = field(default_factory=dict)
    protocol: str = "fewshot"

    def curve(self, task: str, model: str) -> FewshotCurve:
        return next(c for c in self.curves if c.task == task and c.model == model)

    def with_settings(self, **settings: Any) -> FewshotComparison:
        return replace(self, settings={**self.settings, **settings})

    def to_dict(self) -> dict[str, Any]:
        head = {"protocol": self.protocol, "models": self.models, "n_scans": self.n_scans}
        curves = [{"task": c.task, "model": c.model, "points": c.points} for c in self.curves]
        return head | self.settings | {"curves": curves}
