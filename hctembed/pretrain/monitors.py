"""Training monitors: numbers that show learning (or its failure) while a run goes.

- DINO, per step: the entropy of the teacher targets the loss uses (centred and sharpened, or Sinkhorn-Knopp's;
  normalised by ln K: 1.0 is a uniform output over the K prototypes, 0 a single prototype), the KL divergence
  between the teacher and the student on the same global views, and the per-dimension standard deviation of the
  teacher's L2-normalised CLS embeddings across the batch. Collapse shows as entropy at 0 or 1 with KL near 0, or as
  std near 0; :func:`collapse_warning` says so.
- With labels (``--monitor-labels``): every N steps, the exported backbone embeds a fixed set of labelled scans
  (the evaluation input: centre 192 mm), and a leave-one-out kNN AUC and the all-vs-all retrieval mAP, averaged
  over labels, are logged. The labels never reach the training loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hctembed.augment import input_from_base
from hctembed.pretrain.cache import CachedScan, read_base

log = logging.getLogger(__name__)

UNIFORM, PEAKED, FLAT = 0.98, 0.02, 0.1  # FLAT: std below a tenth of random vectors'


@torch.no_grad()
def dino_stats(
    *, teacher_probs: torch.Tensor, student_global: torch.Tensor, teacher_cls: torch.Tensor, student_temp: float,
) -> dict[str, float]:  # fmt: skip
    """``teacher_probs`` (the targets the loss used: centred and sharpened, or Sinkhorn-Knopp's) and the student's
    logits ``student_global`` ``[G*B, K]`` on the same views; ``teacher_cls`` ``[G*B, D]``."""
    k = teacher_probs.shape[-1]
    p = teacher_probs.float()
    logp = torch.log(p.clamp_min(1e-30))
    logq = F.log_softmax(student_global.float() / student_temp, dim=-1)
    entropy = float(-(p * logp).sum(-1).mean()) / math.log(k)
    kl = float((p * (logp - logq)).sum(-1).mean())
    return {"teacher_entropy": round(entropy, 6), "teacher_student_kl": round(kl, 6),
            "embedding_std": embedding_spread(teacher_cls)}  # fmt: skip


def embedding_spread(cls: torch.Tensor) -> float:
    """The per-dimension std across the batch of the L2-normalised vectors ``cls`` ``[N, D]``, averaged over the
    dimensions (random unit vectors: about 1/sqrt(D); a collapse: near 0)."""
    return round(float(F.normalize(cls.detach().float(), dim=-1).std(dim=0, unbiased=False).mean()), 6)


def collapse_warning(stats: dict[str, float], *, dim: int) -> tuple[str, str] | None:
    """(kind, message) when the numbers look like a collapsed teacher, else None. ``dim``: embedding width (random
    unit vectors have a per-dimension std of about 1/sqrt(dim))."""
    entropy, std = stats.get("teacher_entropy"), stats.get("embedding_std")
    if std is not None and std < FLAT / math.sqrt(dim):
        return "flat", (
            f"embeddings nearly identical for every scan: per-dimension std {std:.2e} "
            f"(random unit vectors: {1 / math.sqrt(dim):.3f})"
        )
    if entropy is not None and entropy > UNIFORM:
        return "uniform", f"teacher output is uniform over the prototypes (entropy {entropy:.3f} of ln K)"
    if entropy is not None and entropy < PEAKED:
        return "one-prototype", f"teacher output sits on one prototype (entropy {entropy:.3f} of ln K)"
    return None


@dataclass
class LabelMonitor:
    """kNN AUC and retrieval mAP of the current backbone on a fixed set of labelled cached scans."""

    scans: Sequence[CachedScan]
    y: np.ndarray  # [N, L], NaN unknown
    names: list[str]
    every: int
    k: int = 10

    @classmethod
    def of(cls, scans: Sequence[CachedScan], table, *, every: int, limit: int = 128) -> LabelMonitor | None:
        """The first ``limit`` cached scans (by id) that carry a label; None when there are too few."""
        labelled = {s for s, row in zip(table.scan_ids, table.values, strict=True) if not np.all(np.isnan(row))}
        chosen = sorted((s for s in scans if s.scan_id in labelled), key=lambda s: s.scan_id)[:limit]
        if len(chosen) < 4:
            log.warning("monitor labels: only %d cached scans carry a label; no kNN monitor", len(chosen))
            return None
        return cls(chosen, table.for_scans([s.scan_id for s in chosen]), list(table.names), every)

    @torch.no_grad()
    def embed(self, backbone, *, device, pool: str = "cls") -> np.ndarray:
        """L2-normalised ``[N, D]``: the CLS token (what ``embed`` stores), or the mean of the patch tokens."""
        size = backbone.config.image_size
        was = backbone.training
        backbone.eval()
        out = []
        for i in range(0, len(self.scans), 8):
            x = torch.stack([input_from_base(read_base(s.path), image_size=size) for s in self.scans[i : i + 8]])
            tokens = backbone.forward_features(x.to(device)).float()
            feats = tokens[:, 0] if pool == "cls" else tokens[:, backbone.num_prefix_tokens :].mean(1)
            out.append(F.normalize(feats, dim=-1).cpu())
        backbone.train(was)
        return torch.cat(out).numpy()

    def __call__(self, backbone, *, device) -> dict[str, float | None]:
        """kNN AUC and mAP of the CLS embedding, and of the mean patch token (``_patches``: MAE trains the
        patch tokens, not CLS)."""
        out: dict[str, float | None] = {}
        for pool, suffix in (("cls", ""), ("mean", "_patches")):
            knn, mean_ap = self.scores(self.embed(backbone, device=device, pool=pool))
            out |= {f"monitor_knn_auc{suffix}": knn, f"monitor_map{suffix}": mean_ap}
        return out

    def scores(self, x: np.ndarray) -> tuple[float | None, float | None]:
        from hctembed.eval.classification import roc_auc
        from hctembed.eval.retrieval import all_vs_all

        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        aucs = []
        for j in range(self.y.shape[1]):
            known = np.flatnonzero(~np.isnan(self.y[:, j]))
            yj = self.y[known, j]
            if yj.sum() in (0, yj.size):
                continue
            s = sims[np.ix_(known, known)]
            top = np.argsort(-s, axis=1)[:, : min(self.k, known.size - 1)]
            w = np.exp(np.take_along_axis(s, top, axis=1) / 0.07)
            aucs.append(roc_auc(yj, (w * yj[top]).sum(1) / w.sum(1)))
        report = all_vs_all(x, np.nan_to_num(self.y, nan=0.0), label_names=self.names)
        maps = [r["mAP"] for r in report.rows() if r.get("label") != "mean" and r.get("mAP") is not None]
        maps = [m for m in maps if not (isinstance(m, float) and math.isnan(m))]
        knn = round(float(np.mean(aucs)), 4) if aucs else None
        return knn, round(float(np.mean(maps)), 4) if maps else None
