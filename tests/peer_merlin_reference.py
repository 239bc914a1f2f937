"""Run merlin-vlm's own image encoder (``merlin/models/i3res.py`` + ``inflate.py`` from ``.peers/``) with seeded
random weights on a given input; write its state dict in the released checkpoint's layout and its features.

Run as a separate process (``python tests/peer_merlin_reference.py PEERS INPUT OUT_DIR``; writes
``OUT_DIR/merlin.pt``, the released layout, and ``OUT_DIR/features.pt``) so that torchvision, which
merlin-vlm builds its ResNet-152 from, never enters the test process. Only the image encoder's two files are
loaded: the package's ``__init__`` imports the text and report-generation side (transformers, peft). The ResNet is
built with ``weights=None`` (no download); its seeded initialisation plus randomised BatchNorm statistics are the
weights. The torchvision wheel for this torch is a CUDA build whose compiled operators cannot load beside a CPU
torch; its model code is plain Python, so the two operator schemas its import declares fakes for are declared
first when the compiled library is missing.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path

import torch


def import_torchvision():
    try:
        import torchvision
    except RuntimeError:  # "operator torchvision::nms does not exist": the compiled ops did not load
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision.lib = lib  # the schemas live as long as this object
        import torchvision
    return torchvision


def load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(peers: Path, inp: Path, out: Path) -> None:
    torchvision = import_torchvision()
    models = peers / "merlin" / "models"
    sys.modules["merlin"] = types.ModuleType("merlin")
    sys.modules["merlin.models"] = package = types.ModuleType("merlin.models")
    package.inflate = load_file("merlin.models.inflate", models / "inflate.py")
    i3res = load_file("merlin.models.i3res", models / "i3res.py")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet152(weights=None)
    # as merlin-vlm's ImageEncoder builds it (ImageEmbedding: the pooled layer-4 features)
    net = i3res.I3ResNet(copy.deepcopy(resnet), class_nb=1692, conv_class=True, ImageEmbedding=True).eval()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # BatchNorm statistics that are not the identity, so that every one matters
        if isinstance(m, torch.nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + 0.5 * torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    x = torch.load(inp, weights_only=True)  # [B, 1, X, Y, Z]
    with torch.no_grad():
        features = net(x).reshape(x.shape[0], -1)
    torch.save({"encode_image.i3_resnet." + k: v for k, v in net.state_dict().items()}, out / "merlin.pt")
    torch.save({"features": features, "torchvision": torchvision.__version__}, out / "features.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
