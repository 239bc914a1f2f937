"""MAE: masking exactly 75 %, order restored, loss only on masked patches, normalised and histogram targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hctembed.config import VIT_PRESETS, ViTConfig
from hctembed.model.vit3d import ViT3D
from hctembed.pretrain.mae import MAE3D, MAEConfig, patchify, random_masking

SMALL = MAEConfig(decoder_dim=48, decoder_depth=1, decoder_heads=4)


def test_exactly_75_percent_masked_and_order_restored():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 216, 8)
    visible, mask, ids_restore = random_masking(x, mask_ratio=0.75, generator=g)
    assert visible.shape == (4, 54, 8)
    np.testing.assert_array_equal(mask.sum(dim=1).numpy(), [162] * 4)  # 216 * 0.75 per sample
    for b in range(4):
        kept = torch.nonzero(mask[b] == 0).flatten()
        # the visible tokens are exactly the unmasked ones (as a set: shuffled order)
        rows = {tuple(r.tolist()) for r in visible[b]}
        assert rows == {tuple(x[b, i].tolist()) for i in kept}
    # putting visible + placeholders back with ids_restore puts visible tokens at their original places
    filler = torch.full((4, 216 - 54, 8), float("nan"))
    restored = torch.gather(torch.cat([visible, filler], 1), 1, ids_restore[..., None].expand(-1, -1, 8))
    keep = mask == 0
    torch.testing.assert_close(restored[keep], x[keep])
    assert torch.isnan(restored[~keep]).all()


def test_patchify_matches_the_patch_embedding_order():
    x = torch.randn(2, 3, 16, 16, 16)
    p = patchify(x, patch=8)  # [2, 8, 8*8*8*3]
    conv = torch.nn.Conv3d(3, 1, kernel_size=8, stride=8, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
    by_conv = conv(x).flatten(2)[:, 0]  # [2, 8] in the encoder's token order
    w = conv.weight[0].permute(1, 2, 3, 0).reshape(-1)  # (pz, py, px, c)
    torch.testing.assert_close(p @ w, by_conv, rtol=1e-4, atol=1e-4)


def _model(norm_pix: bool = False) -> MAE3D:
    torch.manual_seed(0)
    return MAE3D(ViT3D(VIT_PRESETS["vit-micro"]), MAEConfig(**{**SMALL.__dict__, "norm_pix_loss": norm_pix}))


def test_loss_only_on_masked_patches():
    model = _model()
    x = torch.rand(2, 3, 48, 48, 48)
    with torch.no_grad():
        loss, pred, mask = model(x, generator=torch.Generator().manual_seed(1))
    target = patchify(x, patch=8)
    want = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, want)
    # changing a visible patch's voxels leaves the loss unchanged; changing a masked one does not
    vis = int(torch.nonzero(mask[0] == 0)[0])
    hid = int(torch.nonzero(mask[0] == 1)[0])

    def bumped(index: int) -> torch.Tensor:
        gz, rem = divmod(index, 36)
        gy, gx = divmod(rem, 6)
        y = x.clone()
        y[0, :, gz * 8 : gz * 8 + 8, gy * 8 : gy * 8 + 8, gx * 8 : gx * 8 + 8] += 0.5
        return y

    assert float(model.loss(bumped(vis), pred, mask)) == float(loss)
    assert float(model.loss(bumped(hid), pred, mask)) != float(loss)


def test_normalised_patch_target():
    model = _model(norm_pix=True)
    x = torch.rand(2, 3, 48, 48, 48)
    loss, pred, mask = model(x, generator=torch.Generator().manual_seed(2))
    t = patchify(x, patch=8).double().numpy()
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    per = ((pred.detach().double().numpy() - t) ** 2).mean(-1)
    m = mask.numpy()
    assert float(loss.detach()) == pytest.approx((per * m).sum() / m.sum(), rel=1e-5)


def test_encoder_sees_only_visible_tokens_and_trains():
    model = _model()
    x = torch.rand(2, 3, 48, 48, 48)
    latent, _, _ = model.encode(x, generator=torch.Generator().manual_seed(3))
    assert latent.shape == (2, 1 + 54, 96)  # CLS + 25 % of 216 patches
    loss, _, _ = model(x, generator=torch.Generator().manual_seed(3))
    loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0


def test_unpatchify_inverts_patchify_and_reconstruction_keeps_visible_patches():
    from hctembed.pretrain.mae import patchify, unpatchify

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, 16, generator=g)
    assert torch.equal(unpatchify(patchify(x, patch=4), patch=4, grid=4, channels=3), x)
    vit = ViTConfig(name="t", image_size=16, patch_size=4, dim=48, depth=1, heads=2, mlp_dim=96)
    mae = MAE3D(ViT3D(vit), MAEConfig(decoder_dim=24, decoder_depth=1, decoder_heads=2)).eval()
    visible, recon = mae.reconstruct(x, generator=torch.Generator().manual_seed(1))
    kept = (visible != 0).any(dim=1)  # voxels of visible patches (zeroed elsewhere)
    assert 0.15 < kept.float().mean() < 0.35  # 25 % of patches visible
    assert torch.equal(recon.permute(0, 2, 3, 4, 1)[kept], x.permute(0, 2, 3, 4, 1)[kept])


def test_patch_histograms_equal_numpy_per_patch_and_channel():
    from hctembed.pretrain.mae import patch_histograms

    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 16, 16, 16, generator=g) * 1.2 - 0.1  # some values outside [0, 1]: counted in the end bins
    h = patch_histograms(x, patch=8, bins=5).numpy()  # [2, 8, 3, 5]
    assert h.shape == (2, 8, 3, 5)
    a = x.numpy()
    for b in range(2):
        for i in range(8):
            gz, rem = divmod(i, 4)
            gy, gx = divmod(rem, 2)
            for c in range(3):
                v = np.clip(a[b, c, gz * 8 : gz * 8 + 8, gy * 8 : gy * 8 + 8, gx * 8 : gx * 8 + 8], 0.0, 1.0)
                want = np.histogram(v, bins=5, range=(0.0, 1.0))[0] / 512
                np.testing.assert_allclose(h[b, i, c], want, atol=1e-7)


def test_histogram_target_loss_is_the_kl_over_masked_patches():
    from scipy.stats import entropy

    from hctembed.pretrain.mae import patch_histograms

    torch.manual_seed(0)
    config = MAEConfig(**{**SMALL.__dict__, "target": "histogram", "histogram_bins": 8})
    model = MAE3D(ViT3D(VIT_PRESETS["vit-micro"]), config)
    x = torch.rand(2, 3, 48, 48, 48)
    with torch.no_grad():
        loss, pred, mask = model(x, generator=torch.Generator().manual_seed(5))
    assert pred.shape == (2, 216, 3 * 8)
    t = patch_histograms(x, patch=8, bins=8).double().numpy()
    p = torch.softmax(pred.double().unflatten(-1, (3, 8)), -1).numpy()
    kl = np.array([[np.mean([entropy(t[b, n, c], p[b, n, c]) for c in range(3)]) for n in range(216)]
                   for b in range(2)])  # fmt: skip
    m = mask.numpy()
    assert float(loss) == pytest.approx((kl * m).sum() / m.sum(), rel=1e-5)
    # a perfect prediction scores 0
    perfect = torch.log(patch_histograms(x, patch=8, bins=8).clamp_min(1e-12)).flatten(2)
    assert float(model.loss(x, perfect, mask)) == pytest.approx(0.0, abs=1e-6)
    # the masked patches only: moving a visible patch's voxels to another bin leaves the loss unchanged
    vis = int(torch.nonzero(mask[0] == 0)[0])
    hid = int(torch.nonzero(mask[0] == 1)[0])

    def moved(index: int) -> torch.Tensor:
        gz, rem = divmod(index, 36)
        gy, gx = divmod(rem, 6)
        y = x.clone()
        y[0, :, gz * 8 : gz * 8 + 8, gy * 8 : gy * 8 + 8, gx * 8 : gx * 8 + 8] = 0.99
        return y

    assert float(model.loss(moved(vis), pred, mask)) == float(loss)
    assert float(model.loss(moved(hid), pred, mask)) != float(loss)


def test_histogram_reconstruction_fills_masked_patches_with_their_predicted_mean():
    from hctembed.pretrain.mae import unpatchify

    vit = ViTConfig(name="t", image_size=16, patch_size=4, dim=48, depth=1, heads=2, mlp_dim=96)
    config = MAEConfig(decoder_dim=24, decoder_depth=1, decoder_heads=2, target="histogram", histogram_bins=4)
    mae = MAE3D(ViT3D(vit), config).eval()
    x = torch.rand(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(6))
    _visible, recon = mae.reconstruct(x, generator=torch.Generator().manual_seed(1))
    latent, mask, ids = mae.encode(x, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(mae.decode(latent, ids).unflatten(-1, (3, 4)), -1)  # [1, 64, 3, 4]
    means = (probs * torch.tensor([0.125, 0.375, 0.625, 0.875])).sum(-1)  # [1, 64, 3]
    want = unpatchify(means[:, :, None, :].expand(-1, -1, 64, -1).flatten(2), patch=4, grid=4, channels=3)
    hidden = unpatchify(mask[..., None].expand(-1, -1, 192), patch=4, grid=4, channels=3).bool()
    torch.testing.assert_close(recon[hidden], want[hidden])
    assert torch.equal(recon[~hidden], x[~hidden])


def test_mae_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="unknown MAE target"):
        MAEConfig(target="hog")
    with pytest.raises(ValueError, match="pixel targets only"):
        MAEConfig(target="histogram", norm_pix_loss=True)
    with pytest.raises(ValueError, match="histogram_bins"):
        MAEConfig(target="histogram", histogram_bins=1)
