"""MAE reconstruction picture: a fixed scan's mid slices, what the encoder saw, and what the decoder made of it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from hctembed.pictures.slices import VIEWS, display_slice, save_figure

COLUMNS = ("input", "visible patches (25 %)", "reconstruction")


def plot_reconstruction(images: Sequence[np.ndarray], *, out: Path, title: str) -> Path:
    """``images``: input, masked input and reconstruction, each ``[Z, Y, X]`` in [0, 1] (brain window); rows are
    the mid axial, coronal and sagittal slices (radiological convention)."""
    fig = Figure(figsize=(7.5, 7.8), dpi=100, facecolor="black")
    for r, view in enumerate(VIEWS):
        for c, (name, volume) in enumerate(zip(COLUMNS, images, strict=True)):
            ax = fig.add_subplot(len(VIEWS), len(COLUMNS), r * len(COLUMNS) + c + 1)
            index = volume.shape[VIEWS.index(view)] // 2
            ax.imshow(display_slice(np.clip(volume, 0, 1), view=view, index=index), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, color="white", fontsize=9)
            if c == 0:
                ax.set_ylabel(view, color="white", fontsize=9)
    fig.suptitle(title, color="white", fontsize=10)
    save_figure(fig, out)
    return out
