"""Full fine-tuning of an encoder with a classification layer (FM-HCT Methods, "Evaluation"): from pretrained
weights or from scratch, on the per-scan preprocessing cache, with exact resume."""

from hctembed.finetune.loop import FinetuneResult, predict, train_classifier
from hctembed.finetune.settings import FinetuneConfig, FinetuneError

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneResult", "predict", "train_classifier"]
