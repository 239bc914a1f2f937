"""Search results as pictures: the query and its neighbours side by side, as a PNG or an offline HTML page.

Each scan is one column: its mid axial, coronal and sagittal slices in the brain window, then the axial
slice through its most attended region with that attention drawn over it. A scan whose file cannot be found or
read gets a placeholder column that says why. Panels are made by :mod:`hctembed.panels`; no torch here.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from hctembed.errors import InputError
from hctembed.pictures.slices import (
    VIEWS,
    display_point,
    display_slice,
    mark_orientation,
    overlay_alpha,
    save_figure,
    window_name,
)

ROWS = (*(f"mid {v}" for v in VIEWS), "most attended")


@dataclass(frozen=True)
class PanelPlanes:
    """What one montage column shows, display-oriented (:func:`display_slice`): the brain window's mid axial,
    coronal and sagittal planes, the axial plane through the most attended voxel, the attention strength on
    that plane (0..1 over the whole volume) and the voxel's ``(row, col)`` there. Small enough to store per
    scan (:meth:`to_bytes`, uint8), so a montage need not read and preprocess the scans again."""

    mid: dict[str, np.ndarray]  # view -> [H, W] in [0, 1]
    attended: np.ndarray  # [Y, X] in [0, 1]
    strength: np.ndarray  # [Y, X] in [0, 1]
    peak: tuple[int, int]

    @classmethod
    def of(cls, brain: np.ndarray, attention: np.ndarray) -> PanelPlanes:
        """From the brain-window channel ``[Z, Y, X]`` of a model input and its attention ``[Z, Y, X]``."""
        peak = tuple(int(v) for v in np.unravel_index(int(np.argmax(attention)), brain.shape))
        strength = (attention - attention.min()) / (np.ptp(attention) or 1.0)
        return cls(
            mid={v: display_slice(brain, view=v, index=brain.shape[VIEWS.index(v)] // 2) for v in VIEWS},
            attended=display_slice(brain, view="axial", index=peak[0]),
            strength=display_slice(strength, view="axial", index=peak[0]),
            peak=display_point(peak, shape=brain.shape, view="axial"),
        )

    def to_bytes(self) -> bytes:
        """uint8 planes (1/255 steps) in an ``.npz``: a few kB per scan."""
        arrays = {f"mid_{v}": self.mid[v] for v in VIEWS} | {"attended": self.attended, "strength": self.strength}
        quantised = {k: np.round(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8) for k, a in arrays.items()}
        buf = io.BytesIO()
        np.savez_compressed(buf, peak=np.asarray(self.peak, np.int32), **quantised)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PanelPlanes:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            planes = {k: z[k].astype(np.float32) / 255.0 for k in z.files if k != "peak"}
            peak = tuple(int(v) for v in z["peak"])
        return cls(
            mid={v: planes[f"mid_{v}"] for v in VIEWS},
            attended=planes["attended"],
            strength=planes["strength"],
            peak=(peak[0], peak[1]),
        )


@dataclass(frozen=True)
class ScanPanel:
    """One column of a montage: ``planes`` (stored with the scan, or made from ``image`` ``[C, S, S, S]``, the
    model input, and ``attention`` ``[S, S, S]``); none of them (and ``missing`` set) when the scan could not
    be shown."""

    title: str
    scan_id: str
    score: float | None
    labels: tuple[str, ...]
    image: np.ndarray | None = None
    attention: np.ndarray | None = None
    missing: str | None = None
    planes: PanelPlanes | None = None

    def shown(self) -> PanelPlanes | None:
        if self.planes is not None:
            return self.planes
        if self.image is None:
            return None
        return PanelPlanes.of(self.image[0], self.attention)

    def caption(self) -> list[str]:
        lines = [self.title, self.scan_id]
        if self.score is not None:
            lines.append(f"cosine {self.score:.4f}")
        lines.append("labels: " + (", ".join(self.labels) if self.labels else "none positive"))
        return lines


def positive_labels(labels: dict[str, float]) -> tuple[str, ...]:
    return tuple(sorted(name for name, v in labels.items() if v == 1))


def render_montage(
    panels: Sequence[ScanPanel], *, out, windows, panel_px: int = 240, title: str | None = None, header: bool = True
) -> dict[str, tuple[int, int, int, int]]:
    """Draw the panels as columns: a PNG of ``panel_px * len(panels)`` x ``panel_px * 4 + 160`` pixels
    (``+ 90`` without the ``header`` that names the window, the rows and the convention).

    ``windows`` are the preprocessing's windows; channel 0 must be the brain window. Returns the pixel box
    ``(left, top, right, bottom)`` of every image, keyed ``"<column>/<row name>"``.
    """
    if not panels:
        raise InputError("nothing to draw: no panels")
    dpi = 100
    cols, rows = len(panels), len(ROWS)
    head_px = 160 if header else 90
    width, height = panel_px * cols, panel_px * rows + head_px
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="black")
    top = 1 - (head_px - 25) / height
    bottom = 25 / height
    fig.subplots_adjust(left=0.01, right=0.99, top=top, bottom=bottom, wspace=0.04, hspace=0.04)
    axes = fig.subplots(rows, cols, squeeze=False)
    jet = colormaps["jet"]
    for c, panel in enumerate(panels):
        planes = panel.shown()
        axes[0][c].set_title(
            "\n".join(panel.caption()), color="white", fontsize=8, loc="center", fontweight="normal", pad=4
        )
        for r, row_name in enumerate(ROWS):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("#333333")
            ax.set_label(f"{c}/{row_name}")
            if planes is None:
                if r == 1:
                    ax.text(0.5, 0.5, _wrap(panel.missing or "not available"), color="orange", ha="center",
                            va="center", fontsize=8, transform=ax.transAxes)  # fmt: skip
                continue
            if row_name == "most attended":
                ax.imshow(planes.attended, cmap="gray", vmin=0, vmax=1)
                rgba = jet(planes.strength)
                rgba[..., 3] = overlay_alpha(planes.strength)
                ax.imshow(rgba)
                ax.plot(planes.peak[1], planes.peak[0], marker="+", color="white", markersize=10, mew=1.5)
                mark_orientation(ax, "axial")
            else:
                view = row_name.split()[1]
                ax.imshow(planes.mid[view], cmap="gray", vmin=0, vmax=1)
                mark_orientation(ax, view)
            if c == 0:
                ax.text(0.02, 0.02, row_name, color="cyan", fontsize=8, transform=ax.transAxes,
                        va="bottom")  # fmt: skip
    if header:
        fig.suptitle(
            f"{title or 'query and nearest neighbours'}\n{window_name(windows[0])}; rows: mid axial, coronal, "
            "sagittal;\naxial slice at the most attended region (last-layer CLS attention, + = peak); "
            "radiological convention",
            color="white",
            fontsize=9,
            y=0.995,
        )
    return save_figure(fig, out)


def _wrap(text: str, width: int = 28) -> str:
    words, lines, line = text.replace("/", "/ ").split(), [], ""
    for w in words:
        if len(line) + len(w) > width and line:
            lines.append(line)
            line = ""
        line += ("" if not line or line.endswith("/") else " ") + w
    return "\n".join([*lines, line])


def render_html(
    panels: Sequence[ScanPanel], *, out: str | Path, windows, title: str = "hctembed search", note: str = ""
) -> Path:
    """A self-contained page (no external files or links): each scan's column as a base64 PNG data URI,
    its caption as text."""
    cards = []
    for panel in panels:
        buf = io.BytesIO()
        render_montage([panel], out=buf, windows=windows, panel_px=220, header=False)
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        caption = "<br>".join(html.escape(line) for line in panel.caption())
        missing = f'<p class="missing">{html.escape(panel.missing)}</p>' if panel.missing else ""
        cards.append(
            f'<figure><img alt="{html.escape(panel.scan_id)}" src="{uri}">'
            f"<figcaption>{caption}</figcaption>{missing}</figure>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ background: #111; color: #eee; font-family: sans-serif; margin: 16px; }}
main {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; background: #222; padding: 6px; border-radius: 4px; }}
figure img {{ display: block; width: 220px; }}
figcaption {{ font-size: 12px; margin-top: 4px; }}
.missing {{ color: orange; font-size: 12px; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{html.escape(note)} Slices: {html.escape(window_name(windows[0]))}; radiological convention (patient right on
image left); last row: axial slice through the most attended region (last-layer CLS attention).</p>
<main>
{chr(10).join(cards)}
</main></body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
