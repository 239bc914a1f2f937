"""The DuckDB connection of one database file: opening (with a readable lock message), transactions, and the
one way bulk rows go in (an Arrow table registered under a name for the statement, then unregistered).

Row-wise inserts of 768-float lists are ~60x slower than Arrow, so every multi-row write uses :meth:`bulk`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from hctembed.errors import first_line
from hctembed.index.store.errors import StoreError

READER_WAIT_S = 15.0  # how long a writer waits for readers to let go before it says who holds the file


class Database:
    """A DuckDB file opened for reading or writing."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        if read_only and not self.path.exists():
            raise StoreError(f"no database at {self.path}; run `hctembed embed ARCHIVE --db {self.path}` first")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # `--db out/h.duckdb` in a folder not made yet
        deadline = time.monotonic() + READER_WAIT_S
        while True:
            try:
                self._con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise StoreError(f"cannot open {self.path}: {first_line(exc)}") from None
                message = self._lock_message(read_only)
                # a reader that holds the file briefly (a server copying its snapshot) is waited for
                if read_only or "for reading" not in message or time.monotonic() > deadline:
                    raise StoreError(message) from None
                time.sleep(0.25)
            except duckdb.Error as exc:  # a truncated or overwritten file: serialization / internal errors
                raise StoreError(
                    f"cannot open {self.path}: not a readable DuckDB database (truncated or damaged?): "
                    f"{first_line(exc)}"
                ) from None
        self.read_only = read_only
        self._tx_depth = 0

    def _lock_message(self, read_only: bool) -> str:
        """Who holds the file: a reader's shared lock still lets another reader in, a writer's does not."""
        holder = "writing"
        if not read_only:
            try:
                duckdb.connect(str(self.path), read_only=True).close()
                holder = "reading (a search, bench or server)"
            except duckdb.Error:
                pass
        return (
            f"{self.path} is open for {holder} by another process"
            + (" (another `hctembed embed`?)" if holder == "writing" else "")
            + "; wait for it to finish, or use a separate --db"
        )

    def close(self) -> None:
        self._con.close()
        if not self.read_only:
            self._wal_as_private_as_the_database()

    # -- statements ---------------------------------------------------------------------------------
    def run(self, sql: str, params: list | None = None) -> None:
        """Execute a statement whose result is not needed."""
        with self._damage_is_one_line():
            self._con.execute(sql, params or [])
        if not self._tx_depth and not self.read_only:  # a write outside a transaction may have made the log
            self._wal_as_private_as_the_database()

    def rows(self, sql: str, params: list | None = None) -> list[tuple]:
        """Every row (read whole: DuckDB 2 refuses new work on a half-read result)."""
        with self._damage_is_one_line():
            return self._con.execute(sql, params or []).fetchall()

    @contextmanager
    def _damage_is_one_line(self) -> Iterator[None]:
        """A file that cannot be read (truncated, overwritten) is the user's to know about, in one line; an
        error in a statement itself stays a bug with its traceback."""
        try:
            yield
        except (duckdb.IOException, duckdb.SerializationException) as exc:
            raise StoreError(f"a file is unreadable, truncated or damaged: {first_line(exc)}") from None

    def one(self, sql: str, params: list | None = None) -> tuple | None:
        """The first row, or None."""
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def arrow(self, sql: str, params: dict | None = None) -> pa.Table:
        """The result as an Arrow table (columnar: vectors come back without a Python list per row)."""
        with self._damage_is_one_line():
            return self._con.sql(sql, params=params).to_arrow_table()

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the file; a failure (a full disk) is one line, and what was committed
        stays in the log, replayed when the file is next opened."""
        try:
            self._con.execute("CHECKPOINT")
        except duckdb.Error as exc:
            raise StoreError(
                f"could not write {self.path} ({first_line(exc).removeprefix('FATAL Error: ')}); the batches "
                "committed so far are kept: free space (or fix the cause) and run again"
            ) from None

    @contextmanager
    def bulk(self, name: str, table: pa.Table) -> Iterator[str]:
        """``table`` visible to SQL as ``name`` for the duration of the block."""
        self._con.register(name, table)
        try:
            yield name
        finally:
            self._con.unregister(name)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all; nested uses join the outer transaction."""
        if self._tx_depth:
            self._tx_depth += 1
            try:
                yield
            finally:
                self._tx_depth -= 1
            return
        self._con.execute("BEGIN TRANSACTION")
        self._tx_depth = 1
        try:
            yield
        except BaseException:
            self._tx_depth = 0
            self._con.execute("ROLLBACK")
            raise
        self._tx_depth = 0
        try:
            self._con.execute("COMMIT")
        except duckdb.Error as exc:  # e.g. a full disk: the transaction is lost, what committed before is not
            with suppress(duckdb.Error):
                self._con.execute("ROLLBACK")
            raise StoreError(
                f"could not commit to {self.path} ({first_line(exc)}); nothing of this batch was stored and "
                "earlier batches are intact: free space (or fix the cause) and run again"
            ) from None
        self._wal_as_private_as_the_database()

    def _wal_as_private_as_the_database(self) -> None:
        """DuckDB creates ``<db>.wal`` with the process's umask; it holds the same rows as the database, so it
        gets the database's permissions (a private database, a private log)."""
        wal = Path(str(self.path) + ".wal")
        try:
            mode = os.stat(self.path).st_mode & 0o777
            if (os.stat(wal).st_mode & 0o777) != mode:
                os.chmod(wal, mode)
        except OSError:
            return


def json_column(values: list[Any]) -> pa.Array:
    """A list of JSON texts (None stays null) as an Arrow string column."""
    return pa.array(values, pa.string())
