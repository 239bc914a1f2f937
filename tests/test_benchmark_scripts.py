"""The benchmark scripts are run by hand (and on a GPU host as one prepared command, where a broken import
would waste the machine): every one must at least import against the current package."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(script)
    assert callable(getattr(module, "main", None)), f"benchmarks/{script}.py has no main()"
    sys.modules.pop(script, None)
