"""The DuckDB store, the only place SQL is written: connection and bulk inserts (:mod:`.connection`),
numbered migrations (:mod:`.migrations`), one repository per table group (:mod:`.models`, :mod:`.scans`,
:mod:`.labels`, :mod:`.probes`; vectors and statuses through a bound :class:`Collection`), typed rows
(:mod:`.rows`), the files beside a database (:mod:`.paths`) and the sorted reading of Parquet parts
(:mod:`.parts`)."""

from hctembed.index.store.collection import Collection
from hctembed.index.store.errors import ModelMismatchError, StoreError
from hctembed.index.store.migrations import SCHEMA_VERSION
from hctembed.index.store.paths import SidecarPaths
from hctembed.index.store.rows import CollectionRow, HitRow, ModelRow, ProbeRow, ScanRow, StatusRow
from hctembed.index.store.store import Store

__all__ = [
    "SCHEMA_VERSION",
    "Collection",
    "CollectionRow",
    "HitRow",
    "ModelMismatchError",
    "ModelRow",
    "ProbeRow",
    "ScanRow",
    "SidecarPaths",
    "StatusRow",
    "Store",
    "StoreError",
]
