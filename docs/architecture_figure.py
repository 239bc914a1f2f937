"""Draw docs/architecture.png: the data flow from archive to results, and the module that does each step.

Run: .venv/bin/python docs/architecture_figure.py
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

STAGES = [
    ("archive", "NIfTI files, DICOM folders,\nzips of DICOM, manifest.parquet", "io/archive.py\nio/manifest.py"),
    ("series", "SeriesRef: pseudonymous ids,\nfiles, header facts, decision", "io/dicom_series.py\nio/selection.py"),
    ("volume", "Volume: float32 HU [Z, Y, X],\nRAS, affine, PHI-free meta", "io/nifti.py, io/dicom.py\nvolume.py"),
    ("model input", "[3, 96, 96, 96]: RAS, 1 mm, 3 HU windows,\npad 224, crop 192, resize 96", "preprocessing/"),
    ("embedding", "[D] L2-normalised, model id +\npreprocessing fingerprint", "model/ (ViT3D, others)\nembed.py"),
    ("store", "DuckDB (source of truth)\nFAISS inner-product index (cache)", "index/store/\nindex/vectors.py"),
    ("results", "hits, mAP / P@K, AUC / AP with CIs,\nPNG montages, maps, plots", "search.py, eval/\npictures/"),
]
SIDE = [
    ("pretrain/ (DINO, MAE as Method objects)", 3.5, "weights for model/"),
    ("workflows/ (typed requests -> results)", 1.5, "joins the stages per task"),
    ("cli/ (parse, call one workflow, print)", 0.5, ""),
]


def draw(out: Path) -> Path:
    fig = Figure(figsize=(12, 8.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 8.2)
    ax.axis("off")
    ax.text(0.3, 7.85, "hctembed: head-CT archive -> searchable embedding index", fontsize=15, weight="bold")
    y = 7.2
    for i, (name, what, where) in enumerate(STAGES):
        ax.add_patch(FancyBboxPatch((0.3, y - 0.75), 7.2, 0.7, boxstyle="round,pad=0.03", fc="#e8f0fb", ec="#3060a0"))
        ax.text(0.45, y - 0.4, name, fontsize=12, weight="bold", va="center")
        ax.text(2.1, y - 0.4, what, fontsize=9.5, va="center")
        ax.text(5.6, y - 0.4, where, fontsize=9, va="center", family="monospace", color="#303030")
        if i < len(STAGES) - 1:
            ax.annotate("", xy=(3.9, y - 0.95), xytext=(3.9, y - 0.75), arrowprops={"arrowstyle": "->", "lw": 1.5})
        y -= 0.95
    for text, yy, note in SIDE:
        ax.add_patch(FancyBboxPatch((7.9, yy), 3.9, 0.6, boxstyle="round,pad=0.03", fc="#f6efe2", ec="#a07030"))
        ax.text(8.0, yy + 0.38, text, fontsize=9.5, va="center", weight="bold")
        if note:
            ax.text(8.0, yy + 0.13, note, fontsize=8.5, va="center", color="#505050")
    ax.text(
        7.9,
        6.2,
        "Rules checked by tests:\n"
        "- no import cycles (lazy imports too)\n"
        "- SQL and duckdb only in index/store/\n"
        "- io, index, eval, pictures: no torch\n"
        "- no file over 400 lines; CLI bodies <= 60\n"
        "- user errors: HctembedError -> exit 2",
        fontsize=9.5,
        va="top",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


if __name__ == "__main__":
    print(draw(Path(__file__).with_name("architecture.png")))
