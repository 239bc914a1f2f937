"""Module boundaries from the design: io, index and eval import no torch; only cli imports typer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_blocked(code: str, *, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    guard = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError("blocked: " + name)
                return None
        sys.meta_path.insert(0, Block())
    """)
    return subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, cwd=ROOT)


def test_io_index_eval_work_without_torch(tmp_path):
    code = textwrap.dedent(f"""
        import numpy as np
        import hctembed.io.archive, hctembed.io.nifti, hctembed.io.labels, hctembed.io.dicom
        import hctembed.io.dicom_series, hctembed.io.manifest, hctembed.io.datasets, hctembed.io.pseudonym
        import hctembed.index.store, hctembed.index.vectors
        import hctembed.eval.retrieval, hctembed.eval.bench, hctembed.eval.stats, hctembed.eval.splits
        import hctembed.eval.classification, hctembed.eval.report, hctembed.eval.protocols
        from hctembed.index.store import Store
        with Store({str(tmp_path / "x.duckdb")!r}) as s:
            s.register_model(model_id="m", name="n", dim=4, config={{}}, weights_path=None, weights_digest=None)
            c = s.collection(model_id="m", fingerprint="f", dim=4)
            s.add_embeddings(c, scan_ids=["a"], vectors=np.ones((1, 4), np.float32))
            from hctembed.index.vectors import open_index
            assert open_index(s, c).ntotal == 1
        print("ok")
    """)
    result = _run_blocked(code, blocked=("torch", "monai", "typer"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_only_cli_imports_typer():
    for path in (ROOT / "hctembed").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "hctembed").parts:
            continue
        assert "import typer" not in path.read_text(), path
