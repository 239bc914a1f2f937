"""Probe identity: a probe's id names its kind and task and digests its model and file bytes."""

from __future__ import annotations

import hashlib


def make_probe_id(*, kind: str, model_id: str, task: str, content: bytes) -> str:
    """``<kind>-<task>-<12 hex of sha256(model id, task, probe file bytes)>``: new weights, new id."""
    digest = hashlib.sha256(model_id.encode() + b"|" + task.encode() + b"|" + content).hexdigest()
    return f"{kind}-{task}-{digest[:12]}"
