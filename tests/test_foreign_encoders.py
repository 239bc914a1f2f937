"""Merlin and CT-FM behind the encoder interface: shapes, dims, released key layouts, weights lookup."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hctembed.model.catalogue import model_info
from hctembed.model.encoders import load_encoder
from hctembed.model.foreign import FOREIGN, WeightsNotFound, find_weights
from hctembed.model.merlin import MerlinConfig, MerlinImageEncoder
from hctembed.preprocessing import preprocess
from hctembed.volume import Volume


def test_ctfm_is_monai_segresencoder_with_its_released_config():
    from monai.networks.nets.segresnet_ds import SegResEncoder

    enc = load_encoder("ct-fm", random_init=True)
    assert enc.dim == 512 and enc.model_id.startswith("ct-fm-")
    assert sum(p.numel() for p in enc.model.parameters()) == 77_760_992  # the published model's size
    # an independent re-statement: MONAI's encoder with the HF config.json, last stage, global average pool
    reference = SegResEncoder(spatial_dims=3, in_channels=1, init_filters=32, blocks_down=(1, 2, 2, 4, 4)).eval()
    reference.load_state_dict(enc.model.encoder.state_dict())
    x = torch.rand(2, 1, 48, 48, 48)
    with torch.no_grad():
        expected = F.normalize(reference(x)[-1].mean(dim=(2, 3, 4)), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode(x), expected, atol=1e-5)


def test_ctfm_released_keys_have_no_prefix_and_load_strictly(tmp_path):
    enc = load_encoder("ct-fm", random_init=True, seed=3)
    released = {k.removeprefix("encoder."): v for k, v in enc.model.state_dict().items()}
    assert "conv_init.weight" in released and "layers.0.blocks.0.conv1.weight" in released
    path = tmp_path / "model.safetensors"
    save_file(released, str(path))
    loaded = load_encoder("ct-fm", weights=path)
    assert loaded.model_id == enc.model_id  # same tensors, same id
    broken = dict(released)
    broken.pop("conv_init.weight")
    save_file(broken, str(path))
    with pytest.raises(Exception, match=r"missing \['encoder.conv_init.weight'\]"):
        load_encoder("ct-fm", weights=path)


def test_merlin_sees_depth_then_the_in_plane_axes_in_their_order_and_old_vectors_go_stale():
    """merlin-vlm's i3res.py permutes [B, 1, X, Y, Z] to [B, 1, Z, X, Y]. An asymmetric input tells the orders
    apart: the features equal the stem fed [Z, X, Y] by hand, and differ from the transposed [Z, Y, X]."""
    from dataclasses import replace

    from hctembed.model.merlin import MERLIN_PREPROCESS

    torch.manual_seed(0)
    model = MerlinImageEncoder(MerlinConfig(layers=(1, 1, 1, 1), width=8, phenotypes=5, contrastive_dim=4)).eval()
    x = torch.zeros(1, 1, 40, 24, 16)
    x[0, 0, :10, :, 4:12] = 1.0  # an asymmetric block: X differs from Y
    with torch.no_grad():
        mine = model.features(x)
        zxy = x.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1)
        by_hand = F.relu(model.bn1(model.conv1(zxy)))
        by_hand = F.max_pool3d(by_hand, kernel_size=3, stride=2, padding=1)
        for i in range(4):
            by_hand = getattr(model, f"layer{i + 1}")(by_hand)
        transposed = model.features(x.transpose(2, 3))
    torch.testing.assert_close(mine, F.adaptive_avg_pool3d(by_hand, 1).flatten(1), rtol=0, atol=0)
    assert not torch.allclose(mine, transposed, atol=1e-4)
    # vectors of the earlier order carry another fingerprint: a re-run re-embeds them
    assert MERLIN_PREPROCESS.fingerprint() != replace(MERLIN_PREPROCESS, revision=0).fingerprint()


def test_merlin_architecture_shapes_and_released_layout(tmp_path):
    small = MerlinConfig(layers=(1, 1, 1, 1), width=8, phenotypes=5, contrastive_dim=4)
    model = MerlinImageEncoder(small).eval()
    x = torch.rand(1, 1, 64, 64, 32)  # [B, 1, X, Y, Z]
    assert model.embed(x).shape == (1, small.dim)
    # stem: depth kept, in-plane halved; maxpool halves all
    stem = F.relu(model.bn1(model.conv1(x.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1))))
    assert stem.shape[2:] == (32, 32, 32)
    full = MerlinImageEncoder().eval()
    keys = set(full.state_dict())
    assert {
        "conv1.weight",
        "layer3.35.conv3.weight",
        "layer4.0.downsample.0.weight",
        "layer4.0.downsample.1.running_var",
        "classifier.weight",
        "contrastive_head.bias",
    } <= keys
    assert full.state_dict()["conv1.weight"].shape == (64, 3, 3, 7, 7)
    assert full.config.dim == 2048 and len(full.layer2) == 8 and len(full.layer3) == 36


def test_merlin_checkpoint_loads_strictly_without_its_text_side(tmp_path):
    enc = load_encoder("merlin", random_init=True, seed=1)
    released = {"encode_image.i3_resnet." + k: v for k, v in enc.model.state_dict().items()}
    released["encode_text.linear_layer.weight"] = torch.zeros(512, 768)
    released["logit_scale"] = torch.tensor(1.0)
    path = tmp_path / "merlin.pt"
    torch.save(released, path)
    loaded = load_encoder("merlin", weights=path)
    assert loaded.model_id == enc.model_id and loaded.dim == 2048
    released["decoder.weight"] = torch.zeros(1)
    torch.save(released, path)
    with pytest.raises(KeyError, match=r"decoder\.weight"):
        load_encoder("merlin", weights=path)


def test_weights_come_from_the_hugging_face_cache_or_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    spec = FOREIGN["ct-fm"]
    with pytest.raises(WeightsNotFound, match=r"model\.safetensors.*project-lighter/ct_fm_feature_extractor"):
        load_encoder("ct-fm")
    snapshot = tmp_path / "hf" / "hub" / "models--project-lighter--ct_fm_feature_extractor" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    enc = load_encoder("ct-fm", random_init=True, seed=2)
    save_file(
        {k.removeprefix("encoder."): v for k, v in enc.model.state_dict().items()},
        str(snapshot / model_info(spec.name).hub.filename),
    )
    assert snapshot / model_info(spec.name).hub.filename == find_weights(spec, None)
    assert load_encoder("ct-fm").model_id == enc.model_id
    with pytest.raises(WeightsNotFound, match="not found"):
        load_encoder("merlin", weights=tmp_path / "nope.pt")


@pytest.mark.parametrize(("name", "shape"), [("merlin", (1, 224, 224, 160)), ("ct-fm", (1, 192, 192, 192))])
def test_each_model_declares_its_own_preprocessing(name, shape):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import head_phantom_xyz

    hu, affine = head_phantom_xyz(shape_xyz=(96, 96, 30), spacing=(2.0, 2.0, 5.0))
    x = preprocess(
        Volume(array=hu.astype(np.float32).transpose(2, 1, 0), affine=affine), config=FOREIGN[name].preprocess
    )
    assert tuple(x.shape) == shape
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.std()) > 0.05
    assert (
        FOREIGN[name].preprocess.fingerprint()
        != FOREIGN["merlin" if name == "ct-fm" else "ct-fm"].preprocess.fingerprint()
    )
