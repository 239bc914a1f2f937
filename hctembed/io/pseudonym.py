"""Keyed pseudonyms for patients, studies and series (HMAC-SHA256 with a secret kept outside the database).

The secret is created on first use (32 random bytes, file mode 0600) at ``$HCTEMBED_SECRET`` or
``~/.config/hctembed/secret.key``. The same secret gives the same keys on every run and machine that
shares it; without it, a key cannot be linked back to an identifier by hashing guesses. Keep it with the
archive, never beside the database you share.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from hctembed.errors import InputError

log = logging.getLogger(__name__)

SECRET_ENV = "HCTEMBED_SECRET"


def default_secret_path() -> Path:
    env = os.environ.get(SECRET_ENV)
    if env:
        return Path(env)
    return Path.home() / ".config" / "hctembed" / "secret.key"


def load_or_create_secret(path: Path) -> bytes:
    """Read the secret, creating it (0600) when the file does not exist yet."""
    if path.exists():
        data = path.read_bytes()
        if len(data) < 16:
            raise InputError(f"pseudonym secret {path} is shorter than 16 bytes; delete it or restore it")
        return data
    path.parent.mkdir(parents=True, exist_ok=True)
    data = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    log.info("created a new pseudonym secret at %s (keep it to get the same keys again)", path)
    return data


@dataclass(frozen=True)
class Pseudonymizer:
    """``key(kind, identifier)`` -> ``"<kind>-<16 hex>"``, e.g. ``pt-3f9a...``; never reversible without the secret."""

    secret: bytes

    @classmethod
    def from_file(cls, path: Path | None = None) -> Pseudonymizer:
        return cls(load_or_create_secret(path or default_secret_path()))

    def key(self, kind: str, identifier: str) -> str:
        digest = hmac.new(self.secret, f"{kind}\x00{identifier}".encode(), hashlib.sha256).hexdigest()
        return f"{kind}-{digest[:16]}"

    def patient(self, patient_id: str) -> str:
        return self.key("pt", patient_id)

    def study(self, study_uid: str) -> str:
        return self.key("st", study_uid)

    def path(self, kind: str, relative_path: str) -> str:
        """A file (``fi``) or folder (``fo``) of an archive, by its path relative to the archive's root: the key
        that stands for it wherever the path itself must not go (see :mod:`hctembed.io.locator`)."""
        return self.key(kind, relative_path)

    def series(self, series_uid: str, *, part: int = 0) -> str:
        """One key per stack: a SeriesInstanceUID holding several stacks gets ``part`` 1, 2, ..."""
        return self.key("se", series_uid if part == 0 else f"{series_uid}#{part}")
