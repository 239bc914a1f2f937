"""How a workflow reports progress without knowing who shows it: the CLI passes rich bars, Python callers pass
nothing (no output) or their own implementation."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    """A source of progress tasks: ``with progress.task("embedding", total=n) as advance: advance(k)``."""

    def task(self, description: str, *, total: int | None) -> AbstractContextManager[Advance]: ...


class NoProgress:
    """Reports nothing (the default for library callers)."""

    def task(self, description: str, *, total: int | None) -> AbstractContextManager[Advance]:
        return nullcontext(lambda _k: None)


NO_PROGRESS = NoProgress()
