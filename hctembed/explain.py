"""What the encoder looks at: CLS attention maps, attention rollout and attention distance (FM-HCT Fig. 5).

Everything is computed on the model input itself (the preprocessed ``[C, S, S, S]`` volume, axes
``[C, Z(S), Y(A), X(R)]``), so maps and images share one grid and line up voxel for voxel.

* **Last-layer CLS attention**: the last block's softmax attention from the CLS token to every patch,
  averaged over heads: ``A_L[0, P + j]`` for patch j (P = CLS + register tokens).
* **Attention rollout** (Abnar & Zuidema 2020): per layer, average the heads, add the identity (the
  residual path), renormalise each row to sum to 1, and multiply the layers,
  ``R = Â_L ··· Â_1``; the map is the CLS row of R restricted to the patches. Register tokens take part in
  the product (they carry information between layers) but are not patches, so they are not mapped.
* **Attention distance** (Methods, eq. (1)): for layer l, head h and patch i,
  ``D_i = Σ_j A_ij d(i, j)``, where ``A`` is the patch-to-patch block of the attention matrix and
  ``d(i, j)`` the Euclidean distance in mm between the centres of patches i and j. With prefix tokens
  (CLS, registers) a patch row of that block sums to less than 1; by default (``renormalise=True``) each
  row is divided by its sum, so ``D_i`` is the attention-weighted *mean* distance over patches (for a
  model without prefix tokens both readings coincide). The patch pitch in mm comes from the
  preprocessing: ``spacing_mm · crop_size / out_size`` per model voxel times the patch size (paper preset:
  1 mm → 192³ crop → 96³, 2 mm voxels, 12-voxel patches = 24 mm).

Figures follow the radiological convention: axial slices with anterior up and the patient's right on the
image left; coronal with superior up and right on the left; sagittal with superior up and anterior left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hctembed.config import PreprocessConfig, ViTConfig, Window
from hctembed.errors import InputError
from hctembed.model.patch_maps import upsample
from hctembed.model.vit3d import ViT3D
from hctembed.pictures.attention import render_distance_plot, render_overlays

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------
def model_voxel_mm(preprocess: PreprocessConfig) -> float:
    """Edge of one model-input voxel in mm: the 1 mm grid's ``crop_size`` voxels area-resized to ``out_size``."""
    return preprocess.spacing_mm * preprocess.crop_size / preprocess.out_size


def patch_size_mm(*, vit: ViTConfig, preprocess: PreprocessConfig) -> float:
    """Patch pitch in mm (vit-base with the paper preset: 12 voxels x 2 mm = 24 mm)."""
    if vit.image_size != preprocess.out_size:
        raise InputError(f"model takes {vit.image_size}³ input but preprocessing gives {preprocess.out_size}³")
    return vit.patch_size * model_voxel_mm(preprocess)


def patch_centres_mm(*, grid: int, patch_mm: float) -> np.ndarray:
    """Centres of the ``grid³`` patches in raster ``[Z, Y, X]`` order, ``[N, 3]`` mm (z, y, x)."""
    idx = np.stack(np.meshgrid(*(np.arange(grid),) * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    return (idx + 0.5) * patch_mm


def patch_distances_mm(*, grid: int, patch_mm: float) -> np.ndarray:
    """``d(i, j)``: Euclidean distance between patch centres, ``[N, N]`` mm."""
    c = patch_centres_mm(grid=grid, patch_mm=patch_mm)
    return np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))


# ----------------------------------------------------------------------------------------------------
# Attention quantities (maps: list over layers of [B, H, T, T], T = prefix + N)
# ----------------------------------------------------------------------------------------------------
def cls_attention(maps: list[torch.Tensor], *, num_prefix: int) -> np.ndarray:
    """Last layer's CLS -> patch attention averaged over heads, ``[B, N]``."""
    return maps[-1][:, :, 0, num_prefix:].mean(dim=1).double().cpu().numpy()


def attention_rollout(maps: list[torch.Tensor], *, num_prefix: int) -> np.ndarray:
    """CLS row of the attention rollout over all layers, restricted to patches, ``[B, N]``."""
    rollout = None
    for attn in maps:
        a = attn.double().mean(dim=1)  # [B, T, T]
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0, num_prefix:].cpu().numpy()


def attention_distance(
    maps: list[torch.Tensor], *, num_prefix: int, grid: int, patch_mm: float, renormalise: bool = True
) -> np.ndarray:
    """Methods eq. (1) per layer, head and patch: ``[B, L, H, N]`` mm (see the module docstring)."""
    d = torch.from_numpy(patch_distances_mm(grid=grid, patch_mm=patch_mm))
    out = []
    for attn in maps:
        a = attn.double().cpu()[:, :, num_prefix:, num_prefix:]  # [B, H, N, N]
        if renormalise:
            a = a / a.sum(dim=-1, keepdim=True)
        out.append((a * d).sum(dim=-1))  # [B, H, N]
    return torch.stack(out, dim=1).numpy()


@dataclass(frozen=True)
class Explanation:
    """Attention of one model input. Maps are on the patch grid ``[g, g, g]`` ([Z, Y, X])."""

    image: np.ndarray  # [C, S, S, S] the model input
    last_layer: np.ndarray  # [g, g, g]
    rollout: np.ndarray  # [g, g, g]
    distance: np.ndarray  # [L, H, N] mm
    patch_mm: float

    def upsampled(self, which: str, *, mode: str = "trilinear") -> np.ndarray:
        """``last_layer``, ``rollout`` or ``distance`` (mean over layers and heads) on the model grid ``[S, S, S]``."""
        g = self.last_layer.shape[0]
        grid_map = self.distance.mean(axis=(0, 1)).reshape(g, g, g) if which == "distance" else getattr(self, which)
        return upsample(grid_map, size=self.image.shape[-1], mode=mode)

    def distance_summary(self) -> dict:
        """Per layer: each head's mean over patches of ``D_i`` and the mean over heads (mm)."""
        per_head = self.distance.mean(axis=-1)  # [L, H]
        return {
            "definition": (
                "attention distance (FM-HCT Methods eq. 1): D_i = sum_j A_ij d(i, j) over patches j, A the "
                "patch-to-patch attention of one head in one layer with each row renormalised to sum to 1, d the "
                "Euclidean distance in mm between patch centres; values are means of D_i over all patches"
            ),
            "patch_mm": self.patch_mm,
            "grid": int(self.last_layer.shape[0]),
            "layers": [
                {"layer": i + 1, "heads_mm": [round(float(v), 4) for v in row], "mean_mm": round(float(row.mean()), 4)}
                for i, row in enumerate(per_head)
            ],
            "mean_mm": round(float(per_head.mean()), 4),
        }


@torch.no_grad()
def explain(model: ViT3D, image: torch.Tensor, *, patch_mm: float) -> Explanation:
    """One model input ``[C, S, S, S]`` -> its :class:`Explanation` (one forward pass with attention)."""
    device = next(model.parameters()).device
    maps = model.attention_maps(image[None].to(device))
    g, p = model.config.grid, model.num_prefix_tokens
    return Explanation(
        image=image.detach().cpu().numpy(),
        last_layer=cls_attention(maps, num_prefix=p)[0].reshape(g, g, g),
        rollout=attention_rollout(maps, num_prefix=p)[0].reshape(g, g, g),
        distance=attention_distance(maps, num_prefix=p, grid=g, patch_mm=patch_mm)[0],
        patch_mm=patch_mm,
    )


def write_explanation(expl: Explanation, *, out_dir: Path, windows: tuple[Window, ...], title: str) -> dict[str, Path]:
    """Write the figures and ``attention_distance.json`` of one explanation into ``out_dir``; returns the paths."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "last_layer": out_dir / "attention_last_layer.png",
        "rollout": out_dir / "attention_rollout.png",
        "distance_map": out_dir / "attention_distance_map.png",
        "distance_plot": out_dir / "attention_distance.png",
        "distance_json": out_dir / "attention_distance.json",
    }
    titles = {"last_layer": "last-layer CLS attention (mean of heads)", "rollout": "attention rollout (all layers)"}
    for which, name in titles.items():
        render_overlays(expl.image, expl.upsampled(which), windows=windows, title=f"{title}: {name}", out=paths[which])
    render_overlays(
        expl.image,
        expl.upsampled("distance"),
        windows=windows,
        title=f"{title}: attention distance per patch (mean of layers and heads)",
        out=paths["distance_map"],
        colorbar_label="attention distance (mm)",
        normalise=False,
        through="centre",
        inside=expl.image.max(axis=0) > 0,  # the head: above the lowest window's floor in any window
    )
    render_distance_plot(
        expl.distance, out=paths["distance_plot"], title=f"{title}: attention distance (patch {expl.patch_mm:g} mm)"
    )
    paths["distance_json"].write_text(json.dumps(expl.distance_summary(), indent=2))
    log.debug("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
