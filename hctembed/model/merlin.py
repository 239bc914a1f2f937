"""Merlin's image encoder (Blankemeier et al., abdominal CT; code MIT): an I3D-inflated ResNet-152.

A re-implementation written from the published architecture so that the released checkpoint loads
strictly: keys ``conv1``, ``bn1``, ``layer1..4.N.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}``,
``classifier`` (2048 -> 1692 phenotypes) and ``contrastive_head`` (2048 -> 512), under the prefix
``encode_image.i3_resnet.`` in the released ``.pt`` (whose ``encode_text.*`` and ``logit_scale`` belong
to the text side and are left out explicitly).

Input ``[B, 1, X, Y, Z]`` = ``[B, 1, 224, 224, 160]`` (MONAI RAS order, depth last). The network sees
``[B, 3, Z, X, Y]`` (the channel repeated 3 times), the order merlin-vlm's ``i3res.py`` permutes to: depth
first, then the in-plane axes as they come. (An earlier hctembed fed ``[Z, Y, X]``, transposed slices; its
vectors carry another preprocessing fingerprint, so a re-run re-embeds them.) Stem conv (3, 7, 7) with
stride (1, 2, 2), a 3x3x3 max-pool with stride 2, bottleneck stages [3, 8, 36, 3] whose 3x3x3 convs stride
2 in every axis at the start of stages 2-4. The embedding is layer4 average-pooled: 2048-d.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hctembed.config import MonaiPreset
from hctembed.errors import UnknownNameError

MERLIN_PREPROCESS = MonaiPreset(
    name="merlin",
    axcodes="RAS",
    spacing_mm=(1.5, 1.5, 3.0),
    spacing_mode="bilinear",
    hu_range=(-1000.0, 1000.0),
    spatial_size=(224, 224, 160),
    revision=1,  # 1: the network sees [Z, X, Y] as merlin-vlm does (0 fed transposed slices)
)
CHECKPOINT_PREFIX = "encode_image.i3_resnet."
TEXT_PREFIXES = ("encode_text.", "logit_scale")


@dataclass(frozen=True)
class MerlinConfig:
    name: str = "merlin"
    layers: tuple[int, int, int, int] = (3, 8, 36, 3)
    width: int = 64
    phenotypes: int = 1692
    contrastive_dim: int = 512

    @property
    def dim(self) -> int:
        return self.width * 8 * 4  # 2048

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv3d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm3d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class MerlinImageEncoder(nn.Module):
    def __init__(self, config: MerlinConfig = MerlinConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.conv1 = nn.Conv3d(3, w, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(w)
        inplanes = w
        for i, blocks in enumerate(config.layers):
            planes = w * 2**i
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck3d(inplanes, planes, stride=2 if (b == 0 and i > 0) else 1))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.classifier = nn.Conv3d(inplanes, config.phenotypes, 1)
        self.contrastive_head = nn.Conv3d(inplanes, config.contrastive_dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, X, Y, Z]`` -> pooled layer4 features ``[B, 2048]``."""
        x = x.permute(0, 1, 4, 2, 3)  # -> [B, 1, Z, X, Y]: depth first, in-plane axes kept (as merlin-vlm)
        x = x.expand(-1, 3, -1, -1, -1)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool3d(x, kernel_size=3, stride=2, padding=1)
        for i in range(len(self.config.layers)):
            x = getattr(self, f"layer{i + 1}")(x)
        return F.adaptive_avg_pool3d(x, 1).flatten(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised 2048-d image embedding ``[B, 2048]``."""
        return F.normalize(self.features(x), dim=-1)


def merlin_state_from_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image-encoder part of a released Merlin state dict, prefix removed; text keys dropped by name.

    Raises KeyError naming keys that are neither image-encoder nor text-side keys.
    """
    image, other = {}, []
    for key, value in state.items():
        if key.startswith(CHECKPOINT_PREFIX):
            image[key[len(CHECKPOINT_PREFIX) :]] = value
        elif not key.startswith(TEXT_PREFIXES):
            other.append(key)
    if other:
        raise UnknownNameError(f"unexpected keys in the Merlin checkpoint: {sorted(other)[:10]}")
    if not image:
        raise UnknownNameError(f"no keys under {CHECKPOINT_PREFIX!r}: not a Merlin checkpoint")
    return image
