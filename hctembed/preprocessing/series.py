"""One candidate series (a :class:`~hctembed.io.archive.SeriesRef`) -> model input, by the fastest path its
preprocessing and file allow: streamed while a ``.nii.gz`` inflates where the variant can stream
(:func:`hctembed.preprocessing.can_stream`), else loaded whole first."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.ImageDraw  # noqa: F401  the image head check's rasteriser: loaded now, not on the first scan's clock
import torch

from hctembed.head_check import NOT_HEAD, image_looks_like_head
from hctembed.io.admission import Limits, check_grid
from hctembed.io.archive import SeriesRef, load_series, load_volume
from hctembed.io.nifti_stream import open_stream
from hctembed.preprocessing import AnyPreprocessConfig, preprocess, variant_of
from hctembed.preprocessing.resample import grid_for
from hctembed.preprocessing.threads import intra_op_threads
from hctembed.rescale import StoredValues
from hctembed.volume import MAX_VOXELS, SkipError


class NotHeadError(SkipError):
    """The image is not a head CT (:func:`hctembed.head_check.image_looks_like_head`)."""

    code = NOT_HEAD


class NotHuError(SkipError):
    """The voxels are not Hounsfield units (a rescale that was not applied): embedding them would be wrong."""

    code = "not_hu"


def check_head(hu: np.ndarray, *, spacing_zyx) -> None:
    """Raise NotHeadError when the HU volume ``[Z, Y, X]`` does not look like a head."""
    evidence = image_looks_like_head(hu, spacing_zyx=spacing_zyx)
    if not evidence.is_head:
        raise NotHeadError(f"not a head CT: {evidence.reason} (--allow-non-head keeps it)")


def check_hu(hu: np.ndarray) -> None:
    """Raise NotHuError when the volume's values do not look like Hounsfield units: CT holds air (the field of
    view around the patient, or padding) near -1000 HU and soft tissue near 0-100; stored values that were not
    rescaled (RescaleIntercept or scl_inter missing) have air near +24 and soft tissue near +1060. Flagged when
    the lowest percent sits above -500 and the commonest tissue value above +500."""
    sample = np.asarray(hu[::2, ::4, ::4], dtype=np.float32)
    air = float(np.percentile(sample, 1))
    if air <= -500:
        return
    # and soft tissue a rescale away from 0-100 HU: a volume cropped inside the head (no air) is still HU
    tissue = sample[(sample > air + 200) & (sample < air + 1500)]
    if tissue.size < 0.05 * sample.size:
        return
    counts, edges = np.histogram(tissue, bins=64)
    mode = float(edges[int(np.argmax(counts))])
    if mode < 500:
        return
    raise NotHuError(
        f"values look unrescaled (air at {air:+.0f}, soft tissue at {mode:+.0f}; in HU they are -1000 and 0-100): "
        "check RescaleIntercept / RescaleSlope (DICOM) or scl_slope / scl_inter (NIfTI)"
    )


def check_scan(hu: np.ndarray | StoredValues, *, spacing_zyx, head_check: bool) -> None:
    """The image checks of every scan before it is embedded: Hounsfield units always, the head when asked. ``hu``
    ``[Z, Y, X]``: HU, or stored values (:attr:`hctembed.volume.Volume.voxels`), of which only the samples the
    checks index are converted."""
    check_hu(hu)
    if head_check:
        check_head(hu, spacing_zyx=spacing_zyx)


def prepare(
    ref: SeriesRef,
    *,
    config: AnyPreprocessConfig,
    max_voxels: int = MAX_VOXELS,
    head_check: bool = False,
    limits: Limits | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load and preprocess one scan: the model input ``[C, Z, Y, X]`` and PHI-free facts about the source.

    Raises VolumeError with a readable reason (also when its headers claim more than ``max_voxels``), and
    NotHeadError when ``head_check`` and the image is not a head (checked before the crop and windows).
    """
    streamed = variant_of(config).stream
    use_stream = ref.format == "nifti" and streamed is not None
    stream = open_stream(ref.path, max_voxels=max_voxels) if use_stream else None
    if stream is not None:
        check_resampled_grid(stream.affine, stream.shape_xyz, config=config, max_voxels=max_voxels)
        spacing = (float(config.spacing_mm),) * 3  # the isotropic grid the stream resamples onto

        def look(hu: torch.Tensor) -> None:
            check_scan(hu.numpy(), spacing_zyx=spacing, head_check=head_check)

        with intra_op_threads():  # the inflate thread is this scan's second (hctembed.preprocessing.threads)
            x = streamed(stream, config=config, look=look)
        source = stream
    else:
        volume = load_series(ref, max_voxels=max_voxels, limits=limits)
        check_resampled_grid(volume.affine, volume.shape_xyz, config=config, max_voxels=max_voxels)
        # a slice stack (zones, tilt) is checked as stored: its mean spacing spans its true extent
        check_scan(volume.voxels, spacing_zyx=volume.spacing_xyz[::-1], head_check=head_check)
        x, source = preprocess(volume, config=config), volume
    return x, source_facts(source)


def check_resampled_grid(affine, shape_xyz, *, config: AnyPreprocessConfig, max_voxels: int) -> None:
    """Refuse (VolumeError) a scan whose isotropic grid (``config.spacing_mm``) would hold more than
    ``max_voxels`` voxels, before it is allocated: a 290-byte NIfTI of 32 x 32 x 20 voxels that claims 156 mm
    voxels would be resampled to 4,837 x 4,837 x 20."""
    spacing = getattr(config, "spacing_mm", None)
    if spacing:
        resampled_shape(affine, shape_xyz, spacing_mm=float(spacing), max_voxels=max_voxels)


def resampled_shape(affine, shape_xyz, *, spacing_mm: float, max_voxels: int) -> np.ndarray:
    """The shape (x, y, z) of the isotropic grid a RAS ``affine`` and ``shape_xyz`` resample to at
    ``spacing_mm``; VolumeError when it holds more than ``max_voxels`` voxels."""
    grid = grid_for(affine=affine, shape_xyz=tuple(shape_xyz), spacing_mm=spacing_mm)
    check_grid(grid.shape, max_voxels=max_voxels, what=f"resampled to {spacing_mm:g} mm, the scan")
    return grid.shape


def prepare_file(
    path, *, config: AnyPreprocessConfig, max_voxels: int = MAX_VOXELS, limits: Limits | None = None
) -> torch.Tensor:
    """One query file (NIfTI, or a DICOM series' file, folder or zip) -> the model input ``[C, Z, Y, X]``, through
    the same admission checks as an archive's scans (declared voxels, zip limits, the resampled grid)."""
    volume = load_volume(path, max_voxels=max_voxels, limits=limits)
    check_resampled_grid(volume.affine, volume.shape_xyz, config=config, max_voxels=max_voxels)
    return preprocess(volume, config=config)


def source_facts(source) -> dict[str, Any]:
    """PHI-free facts of what a scan was read from (a Volume, or a NIfTI stream): its meta, shape and spacing."""
    return {
        **source.meta,
        "shape_xyz": list(source.shape_xyz),
        "spacing_xyz": [round(s, 4) for s in source.spacing_xyz],
    }
