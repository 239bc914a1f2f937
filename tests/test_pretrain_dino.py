"""DINO maths against independent re-statements; the last layer frozen during the first epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hctembed.config import VIT_PRESETS
from hctembed.io.archive import discover
from hctembed.model.vit3d import ViT3D
from hctembed.pretrain import PretrainConfig, run_pretrain
from hctembed.pretrain.dino import (
    DINOHead,
    DINOHeadConfig,
    DINOLoss,
    DINOStudent,
    ema_update,
    koleo_loss,
    make_teacher,
    sinkhorn_knopp,
)
from hctembed.synth import generate_archive
from hctembed.synth.protocol import SynthConfig


def shared_archive(tmp_path_factory, n: int = 4) -> Path:
    root = tmp_path_factory.getbasetemp() / f"pretrain-archive-{n}"
    if not (root / "labels.csv").exists():
        generate_archive(root, n=n, seed=3, config=SynthConfig(matrix=64))
    return root


def reference_dino_loss(student, teacher, centre, *, n_views, n_global, t_temp, s_temp) -> float:
    """Per sample and per (teacher view, other student view) pair: -sum_k q_k log p_k, in float64 numpy."""
    s = student.double().numpy()
    t = teacher.double().numpy()
    c = centre.double().numpy()[0]
    b = t.shape[0] // n_global
    total, count = 0.0, 0
    for tv in range(n_global):
        for sv in range(n_views):
            if sv == tv:
                continue
            for i in range(b):
                logits_t = (t[tv * b + i] - c) / t_temp
                q = np.exp(logits_t - logits_t.max())
                q /= q.sum()
                logits_s = s[sv * b + i] / s_temp
                logp = logits_s - logits_s.max() - np.log(np.exp(logits_s - logits_s.max()).sum())
                total += -(q * logp).sum() / b
            count += 1
    return total / count


@pytest.mark.parametrize("n_views", [2, 5])
def test_loss_matches_independent_restatement(n_views):
    g = torch.Generator().manual_seed(n_views)
    b, k = 3, 17
    student = torch.randn(n_views * b, k, generator=g) * 3
    teacher = torch.randn(2 * b, k, generator=g) * 3
    loss_fn = DINOLoss(out_dim=k, n_global=2)
    loss_fn.center.copy_(torch.randn(1, k, generator=g))
    got = float(loss_fn(student, teacher, teacher_temp=0.05))
    want = reference_dino_loss(student, teacher, loss_fn.center, n_views=n_views, n_global=2, t_temp=0.05, s_temp=0.1)
    assert got == pytest.approx(want, rel=1e-5)


def test_centre_update_is_the_momentum_formula():
    g = torch.Generator().manual_seed(0)
    loss_fn = DINOLoss(out_dim=5, center_momentum=0.9)
    old = torch.randn(1, 5, generator=g)
    loss_fn.center.copy_(old)
    teacher = torch.randn(8, 5, generator=g)
    loss_fn.update_center(DINOLoss.batch_center(teacher))
    want = 0.9 * old.numpy() + 0.1 * teacher.numpy().mean(axis=0, keepdims=True)
    np.testing.assert_allclose(loss_fn.center.numpy(), want, rtol=1e-6, atol=1e-7)
    assert "center" in loss_fn.state_dict()  # saved with checkpoints


def test_ema_update_is_the_formula():
    torch.manual_seed(0)
    student = DINOStudent(ViT3D(VIT_PRESETS["vit-micro"]), DINOHead(96, DINOHeadConfig(out_dim=32, hidden_dim=16)))
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher=teacher, student=student, momentum=0.7)
    s_state = student.state_dict()
    for key, value in teacher.state_dict().items():
        if key.endswith("pos_embed"):
            continue
        torch.testing.assert_close(value, 0.7 * before[key] + 0.3 * s_state[key], rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_head_last_layer_is_weight_normalised():
    head = DINOHead(12, DINOHeadConfig(out_dim=40, hidden_dim=24, bottleneck_dim=8))
    w = head.last_layer.weight()
    np.testing.assert_allclose(w.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
    assert not head.last_layer.weight_g.requires_grad  # gain fixed at 1
    x = torch.randn(3, 12)
    bottleneck = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), bottleneck @ w.T)


def test_batchnorm_head_separates_nearly_identical_backbone_vectors():
    """A fresh ViT maps every head CT to nearly the same CLS vector: without BatchNorm the head's outputs are
    as alike as its inputs (the centred teacher is uniform); with it each hidden unit is standardised over the
    batch and the outputs differ."""
    torch.manual_seed(0)
    x = torch.randn(1, 32) + 1e-3 * torch.randn(16, 32)  # [B, D]: vectors differing by 1e-3
    spread = {}
    for use_bn in (False, True):
        torch.manual_seed(1)
        head = DINOHead(32, DINOHeadConfig(out_dim=64, hidden_dim=48, bottleneck_dim=16, use_bn=use_bn)).train()
        assert any(isinstance(m, torch.nn.BatchNorm1d) for m in head.mlp) == use_bn
        with torch.no_grad():
            out = head(x)
        spread[use_bn] = float((out - out.mean(0)).std(0).mean())
    assert spread[False] < 1e-3 and spread[True] > 100 * spread[False]


@pytest.mark.slow
def test_last_layer_frozen_in_first_epoch_only(tmp_path_factory, tmp_path):
    refs = discover(shared_archive(tmp_path_factory))
    cache = tmp_path_factory.getbasetemp() / "pretrain-cache"
    config = PretrainConfig(
        method="dino", model="vit-micro", epochs=2, batch_size=2, prototypes=64, head_hidden=64,
        bottleneck=32, local_crops=1, lr=1e-3, checkpoint_every=100,
    )  # fmt: skip
    torch.manual_seed(config.seed)
    initial = DINOStudent(
        ViT3D(VIT_PRESETS["vit-micro"]), DINOHead(96, DINOHeadConfig(out_dim=64, hidden_dim=64, bottleneck_dim=32))
    )
    first = run_pretrain(
        refs=refs, config=PretrainConfig(**{**config.__dict__, "max_steps": 2}), out=tmp_path / "a", cache_dir=cache
    )
    assert first.steps_done == 2 and first.last["epoch"] == 0  # 4 scans / batch 2: two steps per epoch
    v0 = initial.head.last_layer.weight_v.detach()
    torch.testing.assert_close(first.trained.head.last_layer.weight_v.detach(), v0, rtol=0, atol=0)
    assert not torch.equal(first.trained.head.mlp[0].weight, initial.head.mlp[0].weight)  # the rest trained
    config3 = PretrainConfig(**{**config.__dict__, "max_steps": 3})
    second = run_pretrain(refs=refs, config=config3, out=tmp_path / "a", resume=True, cache_dir=cache)
    assert second.steps_done == 3 and second.last["epoch"] == 1
    assert not torch.equal(second.trained.head.last_layer.weight_v.detach(), v0)  # epoch 2: trained


def reference_sinkhorn(logits: np.ndarray, *, temp: float, iterations: int) -> np.ndarray:
    """SwAV's alternating normalisation restated in float64 numpy: ``[B, K] -> [B, K]``."""
    q = np.exp(logits.astype(np.float64) / temp).T  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def test_sinkhorn_targets_match_reference_and_balance_prototypes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=g)
    got = sinkhorn_knopp(logits, teacher_temp=0.5, iterations=3)
    np.testing.assert_allclose(got.numpy(), reference_sinkhorn(logits.numpy(), temp=0.5, iterations=3), rtol=1e-5)
    np.testing.assert_allclose(got.sum(dim=1).numpy(), 1.0, rtol=1e-6)  # each scan: a distribution
    many = sinkhorn_knopp(logits, teacher_temp=0.5, iterations=200)
    np.testing.assert_allclose(many.sum(dim=0).numpy(), 12 / 7, rtol=1e-4)  # every prototype: equal mass


def test_sinkhorn_over_two_processes_equals_the_whole_batch():
    """Two processes (threads here, summing through a barrier, as all_reduce does) holding half a batch each get
    the targets of the whole batch. The halves' logits differ in scale, so a per-process shift would show."""
    import threading

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 32, generator=g)
    logits[8:] *= 3.0
    want = sinkhorn_knopp(logits, teacher_temp=0.04, iterations=3)
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def reducer(rank, op):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            combined = op(slots[0], slots[1])
            barrier.wait()  # both have read before either writes its next value
            return t.copy_(combined)

        return reduce

    def process(rank):
        out[rank] = sinkhorn_knopp(
            logits.chunk(2)[rank], teacher_temp=0.04, iterations=3,
            all_reduce_sum=reducer(rank, torch.add),
        )  # fmt: skip

    threads = [threading.Thread(target=process, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(out), want, rtol=1e-5, atol=1e-7)


def test_sinkhorn_targets_spread_a_batch_the_stale_centre_puts_on_one_prototype():
    """Every scan's teacher output shares a large component the running centre has not caught up with: the
    centred softmax puts every scan on the same prototype, Sinkhorn-Knopp balances the batch over prototypes."""
    g = torch.Generator().manual_seed(1)
    b, k = 16, 64
    teacher = 0.1 * torch.randn(b, k, generator=g)
    teacher[:, 3] += 1.0
    centred = DINOLoss(out_dim=k).teacher_probs(teacher, teacher_temp=0.04)  # centre still 0
    assert set(centred.argmax(dim=1).tolist()) == {3}
    balanced = sinkhorn_knopp(teacher, teacher_temp=0.04, iterations=3)
    assert len(set(balanced.argmax(dim=1).tolist())) > b // 2
    assert float(balanced[:, 3].sum()) < 2.0  # the shared prototype gets about its share (b / k), not b


def test_koleo_matches_brute_force_and_spreads_a_batch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, generator=g)
    unit = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    d = np.linalg.norm(unit[:, None] - unit[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert float(koleo_loss(x)) == pytest.approx(-np.log(d.min(axis=1)).mean(), rel=1e-4)
    # its gradient pushes nearly identical vectors apart (finite even for exact duplicates)
    close = (torch.ones(6, 5) + 1e-3 * torch.randn(6, 5, generator=g)).requires_grad_(True)
    before = float(koleo_loss(close.detach()))
    koleo_loss(close).backward()
    assert torch.isfinite(close.grad).all()
    after = float(koleo_loss(close.detach() - 1e-3 * close.grad))
    assert after < before
    dup = torch.ones(4, 5, requires_grad=True)
    koleo_loss(dup).backward()
    assert torch.isfinite(dup.grad).all()
