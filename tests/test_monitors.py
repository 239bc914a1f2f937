"""Training monitors: a teacher collapsed on purpose is named as such, a healthy one is not; the labelled
monitor's kNN AUC and mAP follow the embeddings; curves are drawn from the log."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from hctembed.pictures.training_curves import plot_training_curves
from hctembed.pretrain.monitors import collapse_warning, dino_stats


def stats_of(teacher_out, student_out, cls, k):
    probs = torch.softmax(teacher_out / 0.04, dim=-1)  # centre 0
    return dino_stats(teacher_probs=probs, student_global=student_out, teacher_cls=cls, student_temp=0.1)


def test_a_teacher_collapsed_on_purpose_is_named():
    k, dim, n = 256, 96, 16
    g = torch.Generator().manual_seed(0)
    # every scan gives the same output: uniform teacher after centring, identical embeddings
    same = torch.zeros(n, k)
    stats = stats_of(same, same, torch.ones(n, dim), k)
    assert stats["teacher_entropy"] == 1.0 and stats["embedding_std"] == 0.0
    assert stats["teacher_student_kl"] == 0.0
    kind, message = collapse_warning(stats, dim=dim)
    assert kind == "flat" and "identical" in message
    uniform = stats | {"embedding_std": 0.1}
    assert collapse_warning(uniform, dim=dim)[0] == "uniform"
    # every scan on one prototype
    peaked = torch.full((n, k), -10.0)
    peaked[:, 3] = 10.0
    stats = stats_of(peaked, peaked, torch.randn(n, dim, generator=g), k)
    assert stats["teacher_entropy"] < 0.02
    assert collapse_warning(stats, dim=dim)[0] == "one-prototype"


def test_a_healthy_teacher_raises_no_warning_and_kl_matches_a_reference():
    k, dim, n = 64, 96, 32
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    stats = stats_of(t, s, torch.randn(n, dim, generator=g), k)
    assert collapse_warning(stats, dim=dim) is None
    p = torch.softmax(t / 0.04, -1).double().numpy()
    q = torch.softmax(s / 0.1, -1).double().numpy()
    kl = float(np.mean(np.sum(p * (np.log(p + 1e-300) - np.log(q)), axis=1)))
    entropy = float(np.mean(-np.sum(p * np.log(p + 1e-300), axis=1))) / math.log(k)
    assert stats["teacher_student_kl"] == round(kl, 6) or abs(stats["teacher_student_kl"] - kl) < 1e-4
    assert abs(stats["teacher_entropy"] - entropy) < 1e-5


def test_curves_are_drawn_from_the_log(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": i, "loss": 1.0 / i, "lr": 1e-3, "teacher_entropy": 0.5, "monitor_knn_auc": 0.6} for i in
            range(1, 6)]  # fmt: skip
    log.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 6, "lo')  # a torn last line
    out = plot_training_curves(log, tmp_path / "curves.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png") is None


def test_label_monitor_matches_independent_knn_and_map(tmp_path):
    """kNN AUC (leave-one-out, k nearest by cosine, exp(sim/0.07) weights) and mAP against sklearn / brute force."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from hctembed.config import ViTConfig
    from hctembed.io.labels import LabelTable
    from hctembed.model.vit3d import ViT3D
    from hctembed.pretrain.cache import CachedScan
    from hctembed.pretrain.monitors import LabelMonitor

    rng = np.random.default_rng(0)
    scans, ids, y = [], [], []
    for i in range(12):
        v = (rng.random((3, 56, 56, 56)) * 80).astype(np.uint8)
        if i % 2:
            v[:, 20:36, 20:36, 20:36] = 250
        np.save(tmp_path / f"{i}.npy", v)
        scans.append(CachedScan(f"s{i:02d}", tmp_path / f"{i}.npy"))
        ids.append(f"s{i:02d}")
        y.append([i % 2])
    table = LabelTable(scan_ids=ids, patient_ids=ids, names=["X"], values=np.asarray(y, float))
    monitor = LabelMonitor.of(scans, table, every=1)
    torch.manual_seed(0)
    vit = ViT3D(ViTConfig(name="t", image_size=24, patch_size=8, dim=48, depth=1, heads=2, mlp_dim=96))
    got = monitor(vit, device="cpu")
    x = monitor.embed(vit, device="cpu")
    labels = np.asarray(y, float)[:, 0]
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    scores = []
    for i in range(len(x)):
        top = np.argsort(-sims[i])[:10]
        w = np.exp(sims[i, top] / 0.07)
        scores.append(float((w * labels[top]).sum() / w.sum()))
    assert got["monitor_knn_auc"] == round(roc_auc_score(labels, scores), 4)
    aps = []
    for q in np.flatnonzero(labels == 1):
        others = np.delete(np.arange(len(x)), q)
        aps.append(average_precision_score(labels[others] == 1, sims[q, others]))
    assert abs(got["monitor_map"] - np.mean(aps)) < 1e-4
