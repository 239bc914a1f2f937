"""Errors of the store a user can act on."""

from __future__ import annotations

from hctembed.errors import HctembedError


class StoreError(HctembedError, RuntimeError):
    """A problem with the database file that the user must resolve; the message says how."""


class ModelMismatchError(StoreError):
    """Vectors of two different models or preprocessings were about to meet."""
