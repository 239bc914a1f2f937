"""Attention pictures: a heat map over the three mid-planes through its peak, and attention distance per layer."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from hctembed.config import Window
from hctembed.pictures.slices import (
    VIEWS,
    display_point,
    display_slice,
    mark_orientation,
    overlay_alpha,
    save_figure,
    slice_index,
    window_name,
)


def render_overlays(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    windows: tuple[Window, ...],
    title: str,
    out,
    colorbar_label: str = "attention (fraction of its maximum)",
    normalise: bool = True,
    through: str = "peak",
    width_px: int = 1200,
    inside: np.ndarray | None = None,
) -> dict[str, tuple[int, int, int, int]]:
    """Heat map over the image: one row per window, columns axial / coronal / sagittal through the peak.

    ``image`` ``[C, S, S, S]`` (the model input), ``heat`` ``[S, S, S]`` on the same grid; the slices pass
    through the map's peak (``through="peak"``) or the volume's centre (``"centre"``). The PNG is
    ``width_px`` x ``width_px + 100`` pixels. Returns panel boxes keyed ``"<window index>/<view>"``.

    ``inside`` (bool ``[S, S, S]``): colour only there, evenly, with the colour scale spanning the map's values
    there (a map of a quantity such as attention distance, whose extremes lie in the air around the head);
    otherwise the colour's opacity follows the map's strength.
    """
    n_rows = len(windows)
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, (width_px + 100) / dpi), dpi=dpi, facecolor="black")
    fig.subplots_adjust(left=0.06, right=0.88, top=0.92, bottom=0.02, wspace=0.04, hspace=0.08)
    h = heat.astype(np.float64)
    if inside is not None and not inside.any():
        inside = None  # nothing to mask to: the whole map
    values = h[inside] if inside is not None else h
    low, high = float(values.min()), float(values.max())
    strength = np.clip((h - low) / ((high - low) or 1.0), 0.0, 1.0)  # [0, 1]: the overlay's opacity follows it
    norm = Normalize(0.0, 1.0) if normalise else Normalize(low, high)
    cmap = colormaps["jet"]
    peak = tuple(int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))
    centre = peak if through == "peak" else tuple(n // 2 for n in heat.shape)
    axes = fig.subplots(n_rows, 3, squeeze=False)
    for r, window in enumerate(windows):
        for c, view in enumerate(VIEWS):
            ax = axes[r][c]
            ax.set_label(f"{r}/{view}")
            index = slice_index(centre, view=view)
            ax.imshow(display_slice(image[r], view=view, index=index), cmap="gray", vmin=0, vmax=1)
            rgba = cmap(norm(display_slice(strength if normalise else h, view=view, index=index)))
            if inside is None:
                rgba[..., 3] = overlay_alpha(display_slice(strength, view=view, index=index))
            else:
                rgba[..., 3] = 0.55 * display_slice(inside, view=view, index=index)
            ax.imshow(rgba)
            if through == "peak":
                row, col = display_point(peak, shape=heat.shape, view=view)
                ax.plot(col, row, marker="+", color="white", markersize=12, mew=1.5)
            mark_orientation(ax, view)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{view} (slice {index + 1} of {heat.shape[0]})", color="white", fontsize=11)
            if c == 0:
                ax.set_ylabel(window_name(window), color="white", fontsize=10)
    mappable = ScalarMappable(norm=norm, cmap=cmap)
    cax = fig.add_axes((0.90, 0.1, 0.02, 0.75))
    bar = fig.colorbar(mappable, cax=cax)
    bar.set_label(colorbar_label, color="white")
    bar.ax.tick_params(colors="white")
    fig.suptitle(
        title
        + ("\n+ = peak; " if through == "peak" else "\nslices through the centre; ")
        + ("colour where the map exceeds 25 % of its range; " if inside is None else "colour inside the head; ")
        + "radiological convention (patient right on image left)",
        color="white",
    )
    return save_figure(fig, out)


def render_distance_plot(distance: np.ndarray, *, out, title: str, width_px: int = 900, height_px: int = 600) -> None:
    """Mean attention distance (mm) of every head per layer (dots) and their mean (line); ``distance`` ``[L, H, N]``."""
    per_head = distance.mean(axis=-1)  # [L, H]
    layers = np.arange(1, per_head.shape[0] + 1)
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    ax = fig.add_subplot()
    ax.set_label("distance")
    for h in range(per_head.shape[1]):
        ax.scatter(layers, per_head[:, h], s=28, alpha=0.8, label=f"head {h + 1}" if per_head.shape[1] <= 16 else None)
    ax.plot(layers, per_head.mean(axis=1), color="black", lw=2, label="mean over heads")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (mm)")
    ax.set_xticks(layers)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="best")
    fig.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.1)
    save_figure(fig, out)
