"""Frozen configuration dataclasses: the single source of every preprocessing and model setting."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hctembed.errors import InputError


@dataclass(frozen=True)
class Window:
    """An HU window given as (centre, width); maps [centre - width/2, centre + width/2] onto [0, 1]."""

    centre: float
    width: float

    @property
    def low(self) -> float:
        return self.centre - self.width / 2.0

    @property
    def high(self) -> float:
        return self.centre + self.width / 2.0


PAPER_WINDOWS = (Window(40, 80), Window(80, 200), Window(600, 2800))


@dataclass(frozen=True)
class PreprocessConfig:
    """How a volume becomes model input (FM-HCT Methods, 'Data preprocessing').

    RAS orientation, resample to ``spacing_mm`` isotropic, the windows stacked as channels, pad/crop to
    ``pad_size`` around the head (foreground: HU > ``foreground_hu``), centre-crop ``crop_size``, resize to
    ``out_size`` (area averaging). Output: float32 ``[len(windows), out_size, out_size, out_size]``.
    """

    name: str = "paper"
    spacing_mm: float = 1.0
    windows: tuple[Window, ...] = PAPER_WINDOWS
    pad_size: int = 224
    crop_size: int = 192
    out_size: int = 96
    centre_on_head: bool = True
    foreground_hu: float = -500.0

    def __post_init__(self) -> None:
        if self.crop_size > self.pad_size:
            raise InputError(f"crop_size {self.crop_size} > pad_size {self.pad_size}")
        if self.crop_size % self.out_size:
            raise InputError(
                f"crop_size {self.crop_size} must be a multiple of out_size {self.out_size} "
                "(the final resize is an area average over whole voxels)"
            )
        if self.spacing_mm <= 0:
            raise InputError("spacing_mm must be > 0")
        if not self.windows:
            raise InputError("at least one HU window is needed")

    @property
    def channels(self) -> int:
        return len(self.windows)

    def fingerprint(self) -> str:
        """Stable hash of every field that changes the model input; stored with every vector."""
        return "pp-" + stable_hash(asdict(self))[:16]


@dataclass(frozen=True)
class FitPreprocessConfig:
    """The preprocessing of the FM-HCT code release ('fmhct-code'), beside the paper's.

    RAS orientation, resample to ``spacing_mm`` isotropic (cubic spline), crop to the foreground's bounding
    box (HU > ``foreground_hu``), the windows stacked as channels, then resize the box to ``out_size``³
    without keeping its aspect ratio (area interpolation, MONAI's ``Resize`` default).
    Output: float32 ``[len(windows), out_size, out_size, out_size]``.
    """

    name: str = "fmhct-code"
    spacing_mm: float = 1.0
    windows: tuple[Window, ...] = PAPER_WINDOWS
    out_size: int = 96
    foreground_hu: float = 0.0
    resize_mode: str = "area"

    def __post_init__(self) -> None:
        if self.spacing_mm <= 0:
            raise InputError("spacing_mm must be > 0")
        if not self.windows:
            raise InputError("at least one HU window is needed")
        if self.out_size < 1:
            raise InputError("out_size must be >= 1")

    @property
    def channels(self) -> int:
        return len(self.windows)

    def fingerprint(self) -> str:
        return "pp-" + stable_hash({"kind": "fit", **asdict(self)})[:16]


PREPROCESS_PRESETS: dict[str, PreprocessConfig | FitPreprocessConfig] = {
    "paper": PreprocessConfig(),
    "fmhct-code": FitPreprocessConfig(),
}


# (field, lowest, highest) of ViTConfig's whole numbers: wide enough for any encoder here, narrow enough that a
# config cannot ask for an input or a model no machine holds (a 512³ input is 1.6 GB as three float32 windows)
INPUT_NORMS = ("none", "standardise")
VIT_INT_RANGES = (
    ("image_size", 8, 512), ("patch_size", 1, 64), ("in_channels", 1, 16), ("dim", 6, 8192),
    ("depth", 1, 128), ("heads", 1, 256), ("mlp_dim", 1, 65536), ("register_tokens", 0, 64),
)  # fmt: skip


@dataclass(frozen=True)
class ViTConfig:
    """A 3D ViT: cubic input ``image_size``³ with ``in_channels``, cut into ``patch_size``³ patches."""

    name: str = "vit-base"
    image_size: int = 96
    patch_size: int = 12
    in_channels: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    block_norm_eps: float = 1e-5
    final_norm_eps: float = 1e-6
    register_tokens: int = 0
    # False: the fixed 3D sine-cosine position embedding (a buffer rebuilt from the config). True: a stored
    # ``pos_embed`` tensor ``[1, N, D]`` (learned or imported, e.g. the FM-HCT checkpoint), saved with the weights.
    stored_pos_embed: bool = False
    # "standardise": the input is centred and scaled per channel, ``(x - input_mean) / input_std``, by two buffers
    # ``[C]`` saved with the weights (fitted on the pretraining data), so embed, probes and fine-tuning apply
    # exactly what pretraining saw. "none": the windows in [0, 1] go in as they are.
    input_norm: str = "none"
    drop_path: float = 0.0  # stochastic depth: the last block's drop rate (linear from 0), training only

    def __post_init__(self) -> None:
        # a schema check first, so that a malformed config (from a weights file's metadata, say) is one line,
        # never a ZeroDivisionError or TypeError from the arithmetic below
        for name, low, high in VIT_INT_RANGES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InputError(f"ViTConfig {name} must be a whole number from {low} to {high}, not {value!r}")
        for name in ("qkv_bias", "stored_pos_embed"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"ViTConfig {name} must be true or false, not {getattr(self, name)!r}")
        for name in ("block_norm_eps", "final_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1:
                raise InputError(f"ViTConfig {name} must be a number between 0 and 1, not {value!r}")
        if not isinstance(self.name, str):
            raise InputError(f"ViTConfig name must be text, not {self.name!r}")
        if self.input_norm not in INPUT_NORMS:
            raise InputError(f"ViTConfig input_norm must be one of {', '.join(INPUT_NORMS)}, not {self.input_norm!r}")
        dp = self.drop_path
        if not isinstance(dp, int | float) or isinstance(dp, bool) or not 0 <= dp < 1:
            raise InputError(f"ViTConfig drop_path must be a number from 0 to below 1, not {dp!r}")
        if self.image_size % self.patch_size:
            raise InputError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
        if self.dim % self.heads:
            raise InputError(f"heads {self.heads} does not divide dim {self.dim}")
        if self.dim % 6:
            raise InputError(f"dim {self.dim} must be a multiple of 6 (3D sine-cosine position embedding)")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        if not isinstance(data, dict):
            raise InputError(f"a ViTConfig is a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown ViTConfig fields: {unknown}")
        return cls(**data)


VIT_PRESETS: dict[str, ViTConfig] = {
    "vit-base": ViTConfig(name="vit-base", dim=768, depth=12, heads=12, mlp_dim=3072),
    "vit-small": ViTConfig(name="vit-small", dim=384, depth=12, heads=6, mlp_dim=1536),
    "vit-tiny": ViTConfig(name="vit-tiny", dim=192, depth=12, heads=3, mlp_dim=768),
    # For CPU tests and the demo: 48³ input, 6³ = 216 patches of 8³, 4 layers.
    "vit-micro": ViTConfig(name="vit-micro", image_size=48, patch_size=8, dim=96, depth=4, heads=4, mlp_dim=384),
}

# other groups' CT encoders (hctembed.model.foreign.FOREIGN), named here so that help texts need no torch
FOREIGN_MODELS: tuple[str, ...] = ("merlin", "ct-fm")


@dataclass(frozen=True)
class EmbedConfig:
    """Batch encoding settings (no effect on the vectors, only on speed)."""

    batch_size: int = 2
    num_workers: int = 1
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def stable_hash(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace), for config fingerprints."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class MonaiPreset:
    """Another model's own preprocessing, as a plain MONAI chain (used for Merlin and CT-FM).

    ``Orientation(axcodes)`` -> optional ``Spacing(spacing_mm, mode)`` -> ``ScaleIntensityRange(hu_range ->
    [0, 1], clip)`` -> optional ``CropForeground(HU > foreground_hu)`` -> optional pad/crop to
    ``spatial_size`` (``SpatialPad`` + ``CenterSpatialCrop``). Output float32 ``[1, D0, D1, D2]`` in the
    axis order of ``axcodes`` (MONAI's channel-first layout).
    """

    name: str
    axcodes: str = "RAS"
    spacing_mm: tuple[float, float, float] | None = None
    spacing_mode: str = "bilinear"
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    foreground_hu: float | None = None
    spatial_size: tuple[int, int, int] | None = None
    revision: int = 0  # raised when the same chain feeds the model differently, so stored vectors go stale

    @property
    def channels(self) -> int:
        return 1

    def fingerprint(self) -> str:
        fields = asdict(self)
        if not fields["revision"]:  # revision 0 keeps the fingerprints made before the field existed
            del fields["revision"]
        return "pp-" + stable_hash({"kind": "monai", **fields})[:16]
