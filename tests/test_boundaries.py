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
        import hctembed.eval.retrieval, hctembed.eval.stats, hctembed.eval.splits
        import hctembed.eval.classification, hctembed.eval.report, hctembed.eval.protocols
        from hctembed.index.store import ModelRow, Store
        with Store({str(tmp_path / "x.duckdb")!r}) as s:
            s.models.register(ModelRow(model_id="m", name="n", dim=4))
            c = s.collection(model_id="m", fingerprint="f", dim=4)
            c.add(scan_ids=["a"], vectors=np.ones((1, 4), np.float32))
            from hctembed.index.vectors import open_index
            assert open_index(c).ntotal == 1
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


def test_pictures_draw_without_torch(tmp_path):
    """Slices, montages, the embedding map and report plots need numpy and matplotlib only."""
    out = tmp_path / "m.png"
    code = textwrap.dedent(f"""
        import numpy as np
        import hctembed.pictures.slices, hctembed.pictures.attention, hctembed.pictures.report_plots
        from hctembed.config import Window
        from hctembed.pictures.embedding_map import Colouring, render_map
        from hctembed.pictures.montage import ScanPanel, render_montage
        rng = np.random.default_rng(0)
        panel = ScanPanel(title="q", scan_id="s", score=None, labels=(), image=rng.random((1, 8, 8, 8)),
                          attention=rng.random((8, 8, 8)))
        boxes = render_montage([panel], out={str(out)!r}, windows=(Window(40, 80),), panel_px=80)
        fig = render_map(rng.random((5, 2)), Colouring("SDH", [0, 1, 0, 1, None], True, "labels"),
                         out={str(tmp_path / "map.png")!r}, title="t", method="pca")
        print(len(boxes), fig.legend)
    """)
    result = _run_blocked(code, blocked=("torch", "monai", "typer"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "4"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_commands_that_need_no_model_run_without_torch(tmp_path):
    """--help, models, search by id, bench, map and scan import no torch (nor MONAI): a user pays for the model
    only when a command embeds something."""
    from typer.testing import CliRunner

    from hctembed.cli.app import app

    runner = CliRunner()
    archive, db = tmp_path / "a", tmp_path / "h.duckdb"
    assert runner.invoke(app, ["synth", str(archive), "--n", "4", "--matrix", "48", "-q"]).exit_code == 0
    embedded = runner.invoke(app, ["embed", str(archive), "--db", str(db), "--model", "vit-micro", "--workers", "0"])
    assert embedded.exit_code == 0, embedded.output
    commands = [
        ["--help"],
        ["models"],
        ["search", "--id", "synth-p0001-s1", "--db", str(db), "-k", "2", "--json"],
        ["bench", "retrieval", "--db", str(db), "--json"],
        ["map", "--db", str(db), "--color-by", "SAH", "--out", str(tmp_path / "map.png")],
        ["scan", str(archive), "--json"],
    ]
    for argv in commands:
        code = f"import sys\nsys.argv = ['hctembed', *{argv!r}]\nfrom hctembed.cli.app import main\nmain()\n"
        result = _run_blocked(code, blocked=("torch", "monai"))
        assert result.returncode == 0, (argv, result.stderr[-2000:])
