"""The numbered schema migrations of the store: version N's statements run once, in one transaction, and
``schema_version`` records it. A new database is created straight at the current version.

* v1: ``models``, ``collections`` (one per model and preprocessing fingerprint, each with its own
  ``embeddings_<collection_id>`` table whose ``vector`` is ``FLOAT[dim]``), ``scans``, ``labels``,
  ``scan_status``, and the one sequence every embedding id comes from (int64, monotonic, never reused);
* v2: ``scans.archive_root``; v3: ``probes`` and ``probe_scores``; v4: ``store_info`` (the file's identity);
  v5: ``scan_planes`` (each embedded scan's montage planes).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hctembed.index.store.connection import Database
from hctembed.index.store.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE SEQUENCE embedding_id_seq START 1",
        """CREATE TABLE models (
            model_id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, dim INTEGER NOT NULL,
            config JSON, weights_path VARCHAR, weights_digest VARCHAR, card JSON,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE collections (
            collection_id INTEGER PRIMARY KEY, model_id VARCHAR NOT NULL, fingerprint VARCHAR NOT NULL,
            preprocess JSON, dim INTEGER NOT NULL, created_at TIMESTAMP DEFAULT current_timestamp,
            UNIQUE (model_id, fingerprint))""",
        """CREATE TABLE scans (
            scan_id VARCHAR PRIMARY KEY, patient_id VARCHAR, source VARCHAR, format VARCHAR,
            meta JSON, added_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE labels (
            scan_id VARCHAR NOT NULL, name VARCHAR NOT NULL, value DOUBLE, origin VARCHAR,
            PRIMARY KEY (scan_id, name))""",
        """CREATE TABLE scan_status (
            collection_id INTEGER NOT NULL, source VARCHAR NOT NULL, scan_id VARCHAR,
            status VARCHAR NOT NULL, reason VARCHAR, attempts INTEGER NOT NULL DEFAULT 0,
            file_size BIGINT, file_mtime_ns BIGINT, updated_at TIMESTAMP DEFAULT current_timestamp,
            PRIMARY KEY (collection_id, source))""",
    ),
    # v2: where each scan's archive lives (an absolute folder), so search results can be opened again
    2: ("ALTER TABLE scans ADD COLUMN archive_root VARCHAR",),
    # v3: trained probes (hctembed probe train) and their scores on stored scans (hctembed probe apply)
    3: (
        """CREATE TABLE probes (
            probe_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, model_id VARCHAR NOT NULL,
            task VARCHAR NOT NULL, path VARCHAR, config JSON, metrics JSON,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE probe_scores (
            probe_id VARCHAR NOT NULL, scan_id VARCHAR NOT NULL, model_id VARCHAR NOT NULL,
            task VARCHAR NOT NULL, score DOUBLE NOT NULL, created_at TIMESTAMP DEFAULT current_timestamp,
            PRIMARY KEY (probe_id, scan_id))""",
    ),
    # v4: a random identity per database file, recorded in FAISS manifests so that an index left over from
    # a deleted or replaced database (whose ids restart at 1) is never taken for this one's
    4: (
        "CREATE TABLE store_info (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)",
        "INSERT INTO store_info VALUES ('store_id', CAST(uuid() AS VARCHAR))",
    ),
    # v5: each embedded scan's montage planes (a few kB: mid planes and the attended slice, uint8), so search
    # pictures need not read and preprocess the scans again
    5: (
        """CREATE TABLE scan_planes (
            collection_id INTEGER NOT NULL, scan_id VARCHAR NOT NULL, planes BLOB NOT NULL,
            PRIMARY KEY (collection_id, scan_id))""",
    ),
}


def schema_version(db: Database) -> int:
    exists = db.one("SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'")[0]
    if not exists:
        return 0
    return int(db.one("SELECT max(version) FROM schema_version")[0] or 0)


def migrate(db: Database, *, path: Path) -> None:
    """Bring the file to :data:`SCHEMA_VERSION`; refuse a file newer than this hctembed."""
    db.run(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
        "applied_at TIMESTAMP DEFAULT current_timestamp)"
    )
    current = schema_version(db)
    if current > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema v{current}, newer than this hctembed (v{SCHEMA_VERSION}); upgrade")
    for version in range(current + 1, SCHEMA_VERSION + 1):
        with db.transaction():
            for statement in MIGRATIONS[version]:
                db.run(statement)
            db.run("INSERT INTO schema_version (version) VALUES (?)", [version])
        if current:  # an existing file moved on; a new one is simply created at the current version
            log.info("database %s migrated to schema v%d", path, version)
