"""Multi-crop, MAE and SimCLR views: crop sizes in range, shapes, determinism under a seed, exact geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hctembed.augment import (
    MaeCropConfig,
    MultiCropConfig,
    base_preprocess,
    crop_size_voxels,
    gaussian_blur,
    mae_crop,
    multi_crop,
    random_crop,
    sample_generator,
)
from hctembed.errors import InputError


def test_base_volume_sizes_follow_the_paper():
    assert base_preprocess(image_size=96).out_size == 224  # 224³ at 1 mm for the 96³ model
    assert base_preprocess(image_size=48).out_size == 112
    assert crop_size_voxels((112, 224), base=224) == (112, 224)
    assert crop_size_voxels((64, 112), base=112) == (32, 56)


def test_crop_sizes_stay_in_range():
    base = torch.rand(3, 112, 112, 112)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        crop, edge = random_crop(base, size_range=(32, 56), g=g)
        assert 32 <= edge <= 56 and crop.shape == (3, edge, edge, edge)
        seen.add(edge)
    assert min(seen) <= 34 and max(seen) >= 54  # the whole range is used


def test_multi_crop_shapes_and_determinism():
    base = torch.rand(3, 112, 112, 112)
    config = MultiCropConfig(out_size=48, n_local=3)
    a = multi_crop(base, config=config, g=sample_generator(seed=1, epoch=0, index=5))
    b = multi_crop(base, config=config, g=sample_generator(seed=1, epoch=0, index=5))
    c = multi_crop(base, config=config, g=sample_generator(seed=1, epoch=0, index=6))
    assert len(a) == 5 and all(v.shape == (3, 48, 48, 48) for v in a)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, c, strict=True))
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in a)


def test_mae_crop_shape_and_determinism():
    base = torch.rand(3, 112, 112, 112)
    config = MaeCropConfig(out_size=48)
    a = mae_crop(base, config=config, g=torch.Generator().manual_seed(3))
    b = mae_crop(base, config=config, g=torch.Generator().manual_seed(3))
    assert a.shape == (3, 48, 48, 48) and torch.equal(a, b)


def test_blur_keeps_constants_and_smooths():
    flat = torch.full((1, 10, 10, 10), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, sigma=1.0), flat)
    spike = torch.zeros(1, 11, 11, 11)
    spike[0, 5, 5, 5] = 1.0
    out = gaussian_blur(spike, sigma=1.0)
    assert float(out.sum()) == pytest.approx(1.0, rel=1e-5) and float(out.max()) < 0.1


def test_views_without_intensity_jitter_keep_ct_numbers():
    from dataclasses import replace

    from hctembed.pretrain import PretrainConfig

    base = torch.full((3, 56, 56, 56), 0.3)
    paper = PretrainConfig(model="vit-micro", local_crops=2)
    for config, constant in ((paper, False), (replace(paper, intensity_jitter=False), True)):
        views = multi_crop(base, config=config.multi_crop(), g=torch.Generator().manual_seed(0))
        assert len(views) == 4 and views[0].shape == (3, 48, 48, 48)
        assert all(torch.allclose(v, base[:, :48, :48, :48], atol=1e-6) for v in views) == constant


def test_crop_ranges_are_validated():
    with pytest.raises(ValueError):
        MultiCropConfig(global_mm=(112, 300))


def test_affine_resample_turns_and_moves_the_grid_exactly():
    from hctembed.augment import affine_resample

    x = torch.rand(2, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    same = affine_resample(x, angles=(0.0, 0.0, 0.0), scales=(1.0, 1.0, 1.0), shifts=(0.0, 0.0, 0.0))
    torch.testing.assert_close(same, x, atol=1e-6, rtol=0)
    # a quarter turn about Z maps voxel centres onto voxel centres: numpy's rot90 in the (Y, X) plane
    turned = affine_resample(x, angles=(0.0, 0.0, math.pi / 2), scales=(1.0, 1.0, 1.0), shifts=(0.0, 0.0, 0.0))
    np.testing.assert_allclose(turned.numpy(), np.rot90(x.numpy(), 1, axes=(2, 3)), atol=1e-6)
    # a shift of one voxel (1/6 of the field of view) along X, then along Z; air comes in at the edge
    moved = affine_resample(x, angles=(0.0, 0.0, 0.0), scales=(1.0, 1.0, 1.0), shifts=(1 / 6, 0.0, 0.0))
    torch.testing.assert_close(moved[..., 1:], x[..., :-1], atol=1e-6, rtol=0)
    assert moved[..., 0].abs().max() < 1e-6
    moved = affine_resample(x, angles=(0.0, 0.0, 0.0), scales=(1.0, 1.0, 1.0), shifts=(0.0, 0.0, 1 / 6))
    torch.testing.assert_close(moved[:, 1:], x[:, :-1], atol=1e-6, rtol=0)
    # growing by 2 about the centre: the middle of the output is the middle of the input, stretched
    ball = torch.zeros(1, 16, 16, 16)
    ball[:, 6:10, 6:10, 6:10] = 1.0
    grown = affine_resample(ball, angles=(0.0, 0.0, 0.0), scales=(2.0, 2.0, 2.0), shifts=(0.0, 0.0, 0.0))
    assert float(grown.sum()) == pytest.approx(8 * float(ball.sum()), rel=0.05)


def test_pair_views_are_two_deformed_copies_of_the_embedding_input():
    from hctembed.augment import PairViewConfig, input_from_base, pair_views

    base = torch.rand(3, 28, 28, 28, generator=torch.Generator().manual_seed(1))
    plain = PairViewConfig(out_size=12, rotate_deg=0.0, scale=(1.0, 1.0), shift=0.0, flip_p=0.0, noise_std=(0.0, 0.0),
                           blur_p=0.0)  # fmt: skip
    for view in pair_views(base, config=plain, g=torch.Generator().manual_seed(0)):
        torch.testing.assert_close(view, input_from_base(base, image_size=12), atol=1e-6, rtol=0)
    config = PairViewConfig(out_size=12)
    a = pair_views(base, config=config, g=torch.Generator().manual_seed(3))
    b = pair_views(base, config=config, g=torch.Generator().manual_seed(3))
    assert len(a) == 2 and all(v.shape == (3, 12, 12, 12) for v in a)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))  # a function of the generator only
    assert not torch.equal(a[0], a[1])  # the two views differ
    assert all(float(v.min()) >= 0.0 and float(v.max()) <= 1.0 for v in a)
    with pytest.raises(InputError, match="scale range"):
        PairViewConfig(scale=(1.2, 0.8))


def test_pair_intensity_jitter_gives_each_view_its_own_ct_numbers_and_leaves_the_default_views_alone():
    from hctembed.augment import PairViewConfig, input_from_base, pair_views
    from hctembed.pretrain import PretrainConfig
    from hctembed.pretrain.settings import PretrainError

    base = torch.full((3, 28, 28, 28), 0.5)  # a flat scan: without jitter both views equal it
    still = dict(out_size=12, rotate_deg=0.0, scale=(1.0, 1.0), shift=0.0, flip_p=0.0, noise_std=(0.0, 0.0),
                 blur_p=0.0)  # fmt: skip
    jitter = PairViewConfig(**still, intensity_shift=0.1, contrast=(0.75, 1.25))
    a, b = pair_views(base, config=jitter, g=torch.Generator().manual_seed(0))
    means = float(a.mean()), float(b.mean())
    assert all(0.4 - 1e-6 <= m <= 0.6 + 1e-6 for m in means)  # shifted by at most 0.1
    assert abs(means[0] - means[1]) > 1e-4  # each view its own draw
    ramp = torch.linspace(0, 1, 28).view(1, 28, 1, 1).expand(3, 28, 28, 28).contiguous()
    for view in pair_views(ramp, config=jitter, g=torch.Generator().manual_seed(1)):
        plain = input_from_base(ramp, image_size=12)
        spread = float(view.std() / plain.std())
        assert 0.75 - 1e-3 <= spread <= 1.25 + 1e-3  # contrast about the view's mean, before the [0, 1] clamp
    # off (the default): the same draws as before the option existed, so earlier runs' views are unchanged
    default = PairViewConfig(out_size=12)
    assert not default.jitters_intensity
    assert PretrainConfig(method="simclr", model="vit-micro").pair_views() == PairViewConfig(out_size=48)
    on = PretrainConfig(method="simclr", model="vit-micro", pair_intensity_jitter=True).pair_views()
    assert on.intensity_shift > 0 and on.contrast != (1.0, 1.0)
    with pytest.raises(PretrainError, match="SimCLR setting"):
        PretrainConfig(method="dino", model="vit-micro", pair_intensity_jitter=True)
    with pytest.raises(InputError, match="intensity shift"):
        PairViewConfig(intensity_shift=-0.1)


def test_pair_crops_give_each_view_its_own_cube_of_the_base():
    from hctembed.augment import PairViewConfig, input_from_base, pair_views
    from hctembed.pretrain import PretrainConfig
    from hctembed.pretrain.settings import PretrainError

    # a base whose value is its Z position: a view's mean says which slab of the base it was cut from
    base = torch.linspace(0, 1, 56).view(1, 56, 1, 1).expand(3, 56, 56, 56).contiguous()
    still = dict(out_size=12, rotate_deg=0.0, scale=(1.0, 1.0), shift=0.0, flip_p=0.0, noise_std=(0.0, 0.0),
                 blur_p=0.0)  # fmt: skip
    whole = PairViewConfig(**still)
    cropped = PairViewConfig(**still, crop_mm=(64.0, 112.0))  # 16-28 voxels of the 56-voxel base
    plain = input_from_base(base, image_size=12)
    assert all(torch.allclose(v, plain) for v in pair_views(base, config=whole, g=torch.Generator().manual_seed(0)))
    means, apart = [], 0
    for seed in range(20):
        a, b = pair_views(base, config=cropped, g=torch.Generator().manual_seed(seed))
        assert a.shape == b.shape == (3, 12, 12, 12)
        means += [float(a.mean()), float(b.mean())]
        apart += abs(means[-1] - means[-2]) > 0.05  # the two views of one draw come from different cubes
        spans = [float(v[0, -1].mean() - v[0, 0].mean()) for v in (a, b)]  # a cube of 16-28 of 56 voxels along Z
        assert all(16 / 56 * 11 / 12 - 0.02 <= s_ <= 28 / 56 + 0.02 for s_ in spans)
    assert max(means) - min(means) > 0.3  # cubes from all over the base, not its centre
    assert apart >= 15
    again = pair_views(base, config=cropped, g=torch.Generator().manual_seed(3))
    first = pair_views(base, config=cropped, g=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(again, first, strict=True))  # reproducible from the generator
    with pytest.raises(InputError, match="crop range"):
        PairViewConfig(crop_mm=(112.0, 64.0))
    with pytest.raises(InputError, match="crop range"):
        PairViewConfig(crop_mm=(64.0, 300.0))
    on = PretrainConfig(method="simclr", model="vit-micro", pair_crop_mm=(96.0, 192.0)).pair_views()
    assert on.crop_mm == (96.0, 192.0) and on.out_size == 48
    with pytest.raises(PretrainError, match="SimCLR setting"):
        PretrainConfig(method="mae", model="vit-micro", pair_crop_mm=(96.0, 192.0))
    with pytest.raises(PretrainError, match="pair-crop-mm"):
        PretrainConfig(method="simclr", model="vit-micro", pair_crop_mm=(0.0, 192.0))
