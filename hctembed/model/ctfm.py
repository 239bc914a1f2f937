"""CT-FM's feature extractor (project-lighter, weights Apache-2.0): MONAI's ``SegResEncoder``.

Configuration from its Hugging Face ``config.json``: 3D, 1 input channel, 32 initial filters, blocks
(1, 2, 2, 4, 4), MONAI defaults otherwise (ReLU, batch norm). Pooling rule: the last stage's feature map
(512 channels) is global-average-pooled over all spatial positions into a 512-d vector, which is then
L2-normalised. Checkpoint: ``model.safetensors`` whose keys are the encoder's own (``conv_init.weight``,
``layers.N.blocks.M.{norm1,conv1,norm2,conv2}...``, ``layers.N.downsample.weight``), no prefix.

Preprocessing (its model card): orientation SPL, HU -1024..2048 scaled to [0, 1], crop to the
foreground; resampled here to 1 mm and padded/cropped to 192³ (the CT-FM benchmark scripts resample to
1 mm and use a fixed size) so that scans batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hctembed.config import MonaiPreset

CTFM_PREPROCESS = MonaiPreset(
    name="ct-fm",
    axcodes="SPL",
    spacing_mm=(1.0, 1.0, 1.0),
    spacing_mode="bilinear",
    hu_range=(-1024.0, 2048.0),
    foreground_hu=-1024.0 + 1e-3,
    spatial_size=(192, 192, 192),
)


@dataclass(frozen=True)
class CTFMConfig:
    name: str = "ct-fm"
    init_filters: int = 32
    blocks_down: tuple[int, ...] = (1, 2, 2, 4, 4)

    @property
    def dim(self) -> int:
        return self.init_filters * 2 ** (len(self.blocks_down) - 1)  # 512

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CTFMEncoder(nn.Module):
    def __init__(self, config: CTFMConfig = CTFMConfig()) -> None:
        super().__init__()
        from monai.networks.nets.segresnet_ds import SegResEncoder

        self.config = config
        self.encoder = SegResEncoder(
            spatial_dims=3, in_channels=1, init_filters=config.init_filters, blocks_down=config.blocks_down
        )

    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]:
        return self.encoder.state_dict()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, S, P, L]`` -> ``[B, 512]``: the last stage, global-average-pooled."""
        return F.adaptive_avg_pool3d(self.encoder(x)[-1], 1).flatten(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=-1)
