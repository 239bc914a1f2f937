"""Typed rows of the store's tables, as the repositories read and write them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelRow:
    """One encoder: its config, weights file and digest, and model card."""

    model_id: str
    name: str
    dim: int
    config: dict[str, Any] = field(default_factory=dict)
    weights_path: str | None = None
    weights_digest: str | None = None
    card: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CollectionRow:
    """The vectors of one model under one preprocessing fingerprint."""

    collection_id: int
    model_id: str
    fingerprint: str
    dim: int

    @property
    def table(self) -> str:
        return f"embeddings_{self.collection_id}"


@dataclass(frozen=True)
class ScanRow:
    """PHI-free facts of one scan: pseudonymous ids and protocol facts (its paths live in the locator)."""

    scan_id: str
    patient_id: str | None = None
    format: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StatusRow:
    """What became of one source file for one collection: embedded, failed or skipped (with the reason)."""

    source: str
    scan_id: str | None
    status: str
    reason: str | None = None
    attempts: int = 0
    file_size: int | None = None
    file_mtime_ns: int | None = None


@dataclass(frozen=True)
class HitRow:
    """A stored vector's scan: its id, scan, patient and, when the locator knows it, its file or folder."""

    id: int
    scan_id: str
    patient_id: str | None
    path: str | None


@dataclass(frozen=True)
class ProbeRow:
    """A trained probe (``hctembed probe train``) registered against a model and task."""

    probe_id: str
    kind: str
    model_id: str
    task: str
    path: str | None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
