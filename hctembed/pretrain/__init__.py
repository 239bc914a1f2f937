"""Self-supervised pretraining of the 3D ViT: DINO and MAE (FM-HCT Methods) and SimCLR, one training loop, export.

``run_pretrain`` (loop.py) trains; ``dino.py``, ``mae.py`` and ``simclr.py`` hold the maths; ``schedules.py`` the
per-step values; ``cache.py`` the on-disk preprocessed volumes; ``state.py`` the checkpoint files;
``export.py`` writes the encoder for ``hctembed embed --weights``.
"""

from hctembed.pretrain.loop import PretrainConfig, PretrainError, PretrainResult, run_pretrain

__all__ = ["PretrainConfig", "PretrainError", "PretrainResult", "run_pretrain"]
