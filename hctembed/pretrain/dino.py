"""DINO for the 3D ViT: projection head, self-distillation loss with a centre, EMA teacher; DINOv2's
Sinkhorn-Knopp teacher targets and KoLeo spreading term as options.

Pure maths: nothing here calls torch.distributed or CUDA. The training loop all-reduces the teacher's
batch mean before :meth:`DINOLoss.update_center` when it runs on several processes, and hands
:func:`sinkhorn_knopp` a summing all-reduce.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hctembed.model.vit3d import ViT3D


@dataclass(frozen=True)
class DINOHeadConfig:
    out_dim: int = 65536  # prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    norm_last_layer: bool = True  # weight-norm gain fixed at 1 (the stable choice for ViTs)
    use_bn: bool = False  # BatchNorm after each hidden layer (DINO's use_bn_in_head)


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||)^T`` row-wise, no bias. With ``fixed_gain`` the gain g is 1 and not trained."""

    def __init__(self, in_dim: int, out_dim: int, *, fixed_gain: bool) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_gain)

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """MLP (``nlayers`` linear layers, GELU between; with ``use_bn`` a BatchNorm before each GELU) to a
    ``bottleneck_dim`` vector, L2-normalised, then a weight-normalised linear layer onto ``out_dim`` prototypes.
    ``[B, in_dim] -> [B, out_dim]``.

    The BatchNorm (DINO's ``use_bn_in_head``) standardises each hidden unit across the batch, so scans whose
    backbone vectors differ only slightly (a fresh ViT gives nearly the same CLS token for every head CT) reach the
    prototypes as distinct outputs. On its own it did not keep vit-micro's teacher from flattening on 1,081
    synthetic scans (BENCHMARKS.md, issue 12)."""

    def __init__(self, in_dim: int, config: DINOHeadConfig) -> None:
        super().__init__()
        dims = [in_dim] + [config.hidden_dim] * (config.nlayers - 1) + [config.bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                if config.use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(config.bottleneck_dim, config.out_dim, fixed_gain=config.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6))


class DINOStudent(nn.Module):
    """Backbone CLS -> head. Views are concatenated along the batch: ``[V*B, C, Z, Y, X] -> [V*B, K]``; with
    ``with_cls`` also the backbone's CLS vectors ``[V*B, D]`` (for the KoLeo term)."""

    def __init__(self, backbone: ViT3D, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, *, with_cls: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        cls = self.backbone(x)
        out = self.head(cls)
        return (out, cls) if with_cls else out


def make_teacher(student: DINOStudent) -> DINOStudent:
    """A copy of the student that is never trained by gradients (only by :func:`ema_update`)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(*, teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` for every parameter (same order)."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student differ in structure")
    for t, s in zip(t_params, s_params, strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher distribution of each global view and the student
    distribution of every *other* view, averaged over view pairs and the batch.

    ``center`` ``[1, K]`` is a buffer (saved with the state); :meth:`update_center` moves it towards the
    teacher's batch mean with ``center_momentum``.
    """

    def __init__(self, *, out_dim: int, n_global: int = 2, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_out: torch.Tensor, *, teacher_temp: float) -> torch.Tensor:
        """DINO's targets: the centred teacher output sharpened by ``teacher_temp``, ``[G*B, K]``."""
        return F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach()

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, *, teacher_temp: float,
        teacher_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``student_out [V*B, K]`` (views in blocks of B, globals first), ``teacher_out [G*B, K]`` -> scalar.
        ``teacher_probs`` ``[G*B, K]`` replaces the centred softmax (e.g. :func:`sinkhorn_knopp`'s targets)."""
        n_views = student_out.shape[0] // (teacher_out.shape[0] // self.n_global)
        s_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(n_views)
        if teacher_probs is None:
            teacher_probs = self.teacher_probs(teacher_out, teacher_temp=teacher_temp)
        t_prob = teacher_probs.detach().chunk(self.n_global)
        total, terms = 0.0, 0
        for ti, q in enumerate(t_prob):
            for si, logp in enumerate(s_logp):
                if si == ti:  # the same view seen by both networks: skipped
                    continue
                total = total + torch.sum(-q * logp, dim=-1).mean()
                terms += 1
        return total / terms

    @staticmethod
    def batch_center(teacher_out: torch.Tensor) -> torch.Tensor:
        """Mean teacher output over this process's batch, ``[1, K]`` (the loop averages it across ranks)."""
        return teacher_out.detach().float().mean(dim=0, keepdim=True)

    @torch.no_grad()
    def update_center(self, batch_center: torch.Tensor) -> None:
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


def cancel_last_layer_grads(head: DINOHead) -> None:
    """Drop the gradients of the prototype layer (done during the first epoch(s): stabilises the start)."""
    for p in head.last_layer.parameters():
        p.grad = None


@torch.no_grad()
def sinkhorn_knopp(
    teacher_out: torch.Tensor, *, teacher_temp: float, iterations: int = 3,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Teacher targets balanced over the batch (SwAV; DINOv2's ``centering="sinkhorn_knopp"``): ``[B, K] -> [B, K]``.

    ``exp(teacher_out / teacher_temp)`` is rescaled alternately so that every prototype receives the same total
    mass over the batch and every row sums to 1. Unlike the running centre, this cannot go uniform: scans whose
    teacher outputs differ only slightly still get different, sharp targets, so the student has something to
    match. ``all_reduce_sum`` sums a tensor over processes (the batch is the global one under DDP; without it, one
    process's)."""
    reduce = all_reduce_sum or (lambda t: t)
    # float64 and no shift, as DINOv2 (no shift): a shift per process would survive the all-reduced prototype sums,
    # and one global shift underflows the scans far below the batch's largest logit; float64 holds exp(x) to
    # |x| < 700 (a cosine head at teacher temperature 0.04 reaches 25)
    q = torch.exp(teacher_out.double() / teacher_temp).t()  # [K, B]
    k = q.shape[0]
    b = reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= reduce(q.sum())
    for _ in range(iterations):
        q /= reduce(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: mass 1/B
        q /= b
    return (q * b).t().float()


@torch.autocast("cuda", enabled=False)  # nearest neighbours in float32, as DINOv2 (bf16 picks wrong ones)
def koleo_loss(x: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo term: ``-mean log(distance to the nearest other vector)`` of the L2-normalised rows of ``x``
    ``[B, D]`` (B >= 2; under DDP, each process's micro-batch, as DINOv2) -> scalar. Minimising it spreads the
    batch's embeddings over the sphere."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.t()
        sims.fill_diagonal_(-2.0)
        nearest = sims.argmax(dim=1)
    distance = torch.sqrt(((x - x[nearest]) ** 2).sum(dim=-1) + eps)
    return -torch.log(distance + eps).mean()
