"""Parquet parts of a sharded embedding run read back in run order, by an in-memory DuckDB of their own that
sorts them (spilling to disk beyond a memory limit), so that merging them does not hold them all in memory."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa


def sorted_parts(
    paths: Sequence[Path], *, key: str, temp_dir: Path, memory_limit: str, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Every row of the Parquet files ``paths`` ordered by the integer column ``key``, in batches of at most
    ``batch_rows``. A key that occurs in several files keeps the row of the file whose name sorts last (a
    part re-written later has a higher sequence number in its name)."""
    if not paths:
        return
    con = duckdb.connect()
    try:
        con.execute(f"SET temp_directory = '{temp_dir}'")
        con.execute(f"SET memory_limit = '{memory_limit}'")  # the sort spills beyond this
        reader = con.sql(
            "SELECT * EXCLUDE (filename) FROM read_parquet($files, filename = true) "
            f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY filename DESC) = 1 ORDER BY {key}",
            params={"files": [str(p) for p in paths]},
        ).to_arrow_reader(batch_rows)
        yield from reader
    finally:
        con.close()
