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
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hctembed.errors import InputError
from hctembed.pictures.slices import (
    ORIENTATION,
    VIEWS,
    display_point,
    display_slice,
    overlay_alpha,
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
    ``(left, top, right, bottom)`` of every image, keyed ``"<column>/<row name>"``. Composed as one pixel array
    and written with Pillow (no matplotlib figure: a montage costs about a tenth of a second).
    """
    if not panels:
        raise InputError("nothing to draw: no panels")
    cols, rows = len(panels), len(ROWS)
    head_px = 160 if header else 90
    width, height = panel_px * cols, panel_px * rows + head_px
    top0, pad = head_px - 25, max(2, panel_px // 60)
    side = panel_px - 2 * pad
    canvas = np.zeros((height, width, 3), np.float32)
    boxes, texts = {}, []  # texts: (x, y, text, colour, anchor, size)
    for c, panel in enumerate(panels):
        planes = panel.shown()
        texts.append((c * panel_px + panel_px // 2, top0 - 4, "\n".join(panel.caption()), "white", "md", 11))
        for r, row_name in enumerate(ROWS):
            left, top = c * panel_px + pad, top0 + r * panel_px + pad
            boxes[f"{c}/{row_name}"] = (left, top, left + side, top + side)
            canvas[top : top + side, left : left + side] = 0.2  # the cell, grey where there is no image
            if c == 0:  # in the lower left corner, clear of the orientation letter at the bottom's middle
                texts.append((left + 3, top + side - 3, row_name, "cyan", "ld", _size_to_fit(row_name, side // 2 - 12)))
            if planes is None:
                if r == 1:
                    texts.append((left + side // 2, top + side // 2, _wrap(panel.missing or "not available"),
                                  "orange", "mm", 11))  # fmt: skip
                continue
            view = "axial" if row_name == "most attended" else row_name.split()[1]
            image = planes.attended if row_name == "most attended" else planes.mid[view]
            rgb = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=-1)
            if row_name == "most attended":
                alpha = overlay_alpha(planes.strength)[..., None]
                rgb = rgb * (1 - alpha) + _jet(planes.strength) * alpha
            block, (y, x) = _fit(rgb, side)
            canvas[top + y : top + y + block.shape[0], left + x : left + x + block.shape[1]] = block
            if row_name == "most attended":
                scale = block.shape[0] / rgb.shape[0]
                _cross(canvas, top + y + (planes.peak[0] + 0.5) * scale, left + x + (planes.peak[1] + 0.5) * scale)
            up, down, west, east = ORIENTATION[view]
            texts += [
                (left + side // 2, top + 2, up, "yellow", "mt", 12),
                (left + side // 2, top + side - 2, down, "yellow", "mb", 12),
                (left + 3, top + side // 2, west, "yellow", "lm", 12),
                (left + side - 3, top + side // 2, east, "yellow", "rm", 12),
            ]
    if header:
        texts.append((width // 2, 4, f"{title or 'query and nearest neighbours'}\n{window_name(windows[0])}; rows: mid "
                      "axial, coronal, sagittal;\naxial slice at the most attended region (last-layer CLS attention, "
                      "+ = peak); radiological convention", "white", "ma", 12))  # fmt: skip
    image = Image.fromarray((canvas * 255 + 0.5).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for x, y, text, colour, anchor, size in texts:
        font = _font(size)
        if "\n" in text:
            draw.multiline_text((x, y), text, fill=colour, font=font, anchor=anchor, align="center", spacing=2)
        else:
            draw.text((x, y), text, fill=colour, font=font, anchor=anchor)
    if isinstance(out, str | Path):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="png")
    return boxes


def _fit(rgb: np.ndarray, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``rgb [h, w, 3]`` scaled (nearest voxel, aspect kept) to fit a ``side`` square, and its offset in it."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    out_h, out_w = max(1, round(h * scale)), max(1, round(w * scale))
    rows = np.minimum((np.arange(out_h) / scale).astype(int), h - 1)
    cols = np.minimum((np.arange(out_w) / scale).astype(int), w - 1)
    return rgb[rows][:, cols], ((side - out_h) // 2, (side - out_w) // 2)


def _jet(x: np.ndarray) -> np.ndarray:
    """The jet colour map, ``[..., 3]`` in [0, 1], from its piecewise-linear definition."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def _cross(canvas: np.ndarray, y: float, x: float, *, arm: int = 6) -> None:
    """A white '+' centred at pixel (y, x)."""
    yi, xi = int(y), int(x)
    canvas[max(yi - 1, 0) : yi + 1, max(xi - arm, 0) : xi + arm + 1] = 1.0
    canvas[max(yi - arm, 0) : yi + arm + 1, max(xi - 1, 0) : xi + 1] = 1.0


@lru_cache(maxsize=8)
def _size_to_fit(text: str, width_px: int, *, largest: int = 11, smallest: int = 7) -> int:
    """The largest font size (``smallest`` at least) at which ``text`` is at most ``width_px`` wide."""
    for size in range(largest, smallest, -1):
        if _font(size).getlength(text) <= width_px:
            return size
    return smallest


def _font(size: int):
    return ImageFont.load_default(size=size)


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
