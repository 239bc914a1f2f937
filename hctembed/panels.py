"""Panels for search pictures: the planes ``embed`` stored with each scan, or, for a scan without them, the scan
loaded, preprocessed as at embedding time and explained (last-layer CLS attention upsampled to the model grid),
so the attention and the image share one grid. Drawn by :mod:`hctembed.pictures.montage`. Orientation is
radiological (see :mod:`hctembed.pictures.slices`). The encoder (and torch) is loaded only when a scan must be
read from its file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hctembed.errors import HctembedError
from hctembed.pictures.montage import PanelPlanes, ScanPanel, positive_labels
from hctembed.volume import VolumeError

if TYPE_CHECKING:
    from hctembed.model.encoders import Encoder

log = logging.getLogger(__name__)

QUERY_FILE = "query file"


def scan_panel(
    encoder: Encoder,
    path: str | Path | None,
    *,
    title: str,
    scan_id: str,
    score: float | None = None,
    labels: Sequence[str] = (),
) -> ScanPanel:
    """Load, preprocess and explain one scan; a missing or unreadable file gives a placeholder panel."""
    from hctembed.explain import explain, patch_size_mm
    from hctembed.io.archive import load_volume
    from hctembed.preprocessing import preprocess

    base = {"title": title, "scan_id": scan_id, "score": score, "labels": tuple(labels)}
    # placeholders are drawn into pictures that get shared: they never name the file (its path may carry PHI)
    if path is None:
        return ScanPanel(**base, missing="file location not recorded (no locator entry)")
    path = Path(path)
    if not path.exists():
        return ScanPanel(**base, missing="its file is no longer where the locator says")
    try:
        x = preprocess(load_volume(path), config=encoder.preprocess)
    except (VolumeError, HctembedError, OSError) as exc:
        log.debug("cannot read %s", path, exc_info=True)
        return ScanPanel(**base, missing=f"cannot read its file ({type(exc).__name__})")
    pmm = patch_size_mm(vit=encoder.model.config, preprocess=encoder.preprocess)
    expl = explain(encoder.model, x, patch_mm=pmm)
    return ScanPanel(**base, image=expl.image, attention=expl.upsampled("last_layer"))


def _panel(encoder: Callable[[], Encoder], path, planes: bytes | None, **base) -> ScanPanel:
    """From the planes stored with the scan when there are any, else from its file (read and explained now)."""
    if planes is not None:
        return ScanPanel(score=base.pop("score", None), **base, planes=PanelPlanes.from_bytes(planes))
    return scan_panel(encoder(), path, **base)


def search_panels(
    collection, encoder: Encoder | Callable[[], Encoder], hits: Sequence, *, query_path: str | Path | None = None,
    query_scan_id: str | None = None,
) -> list[ScanPanel]:  # fmt: skip
    """Panels for a search: the query (a file, or a stored scan id) then one per hit, from their stored planes
    or files found through ``collection.hits(...)[id].path``. ``encoder``: the collection's encoder, or a
    function that loads it (called only when a scan must be read from its file)."""
    encoder = encoder if callable(encoder) else (lambda fixed=encoder: fixed)
    if query_path is not None:
        # not its file name (pictures get shared, and names carry PHI); its scan id when its content is stored
        scan_id = f"{QUERY_FILE} ({query_scan_id})" if query_scan_id else QUERY_FILE
        path: str | Path | None = query_path
    else:
        scan_id = query_scan_id
        vid, _ = collection.vector_of(scan_id)
        row = collection.hits([vid]).get(vid)
        path = row.path if row else None
    labelled = query_scan_id if query_scan_id else scan_id
    query_labels = positive_labels(collection.store.labels.of([labelled]).get(labelled, {}))
    # the planes stored at embedding time (a query file is embedded now, so its own are made now)
    stored = collection.planes([h.scan_id for h in hits] + ([scan_id] if query_path is None else []))
    query_planes = stored.get(scan_id) if query_path is None else None  # a file is not the stored scan of its name
    panels = [_panel(encoder, path, query_planes, title="query", scan_id=scan_id, labels=query_labels)]
    rows = collection.hits([h.id for h in hits])
    for h in hits:
        panels.append(
            _panel(
                encoder,
                rows[h.id].path if h.id in rows else None,
                stored.get(h.scan_id),
                title=f"#{h.rank}",
                scan_id=h.scan_id,
                score=h.score,
                labels=positive_labels(h.labels),
            )
        )
        if panels[-1].missing:
            log.warning("%s: %s", h.scan_id, panels[-1].missing)
    return panels
