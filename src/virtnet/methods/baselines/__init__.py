"""Baselines shared by several methods' benchmarks: individual networks, joint training, fine-tuning,
feature extraction."""

from virtnet.methods.baselines.lwf import LwF, as_input_of, distillation_loss, set_bn_eval
from virtnet.methods.baselines.methods import (
    FeatureExtraction,
    FineTune,
    Individual,
    IndividualNets,
    Joint,
    load_matching,
)

__all__ = [
    "FeatureExtraction",
    "FineTune",
    "Individual",
    "IndividualNets",
    "Joint",
    "LwF",
    "as_input_of",
    "distillation_loss",
    "load_matching",
    "set_bn_eval",
]
