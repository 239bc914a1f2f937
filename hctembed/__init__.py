"""hctembed: turn a head-CT archive into a searchable embedding index (FM-HCT).

Public API (imported lazily, so ``hctembed.io``, ``hctembed.index`` and ``hctembed.eval`` work without torch)::

    from hctembed import load_volume, preprocess, load_encoder, embed_archive, Store, search_file, search_id
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_volume": "hctembed.io.archive",
    "discover": "hctembed.io.archive",
    "Volume": "hctembed.volume",
    "PreprocessConfig": "hctembed.config",
    "ViTConfig": "hctembed.config",
    "preprocess": "hctembed.preprocessing",
    "preprocess_reference": "hctembed.preprocessing",
    "load_encoder": "hctembed.model.encoders",
    "embed_archive": "hctembed.embedding.run",
    "Store": "hctembed.index.store",
    "open_index": "hctembed.index.vectors",
    "search_file": "hctembed.search",
    "search_id": "hctembed.search",
    "all_vs_all": "hctembed.eval.retrieval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hctembed' has no attribute {name!r}")
