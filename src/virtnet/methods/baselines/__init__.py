"""Baselines shared by several methods' benchmarks: individual networks, joint training, fine-tuning,
feature extraction."""

from virtnet.methods.baselines.methods import (
    FeatureExtraction,
    FineTune,
    Individual,
    IndividualNets,
    Joint,
    load_matching,
)

__all__ = ["FeatureExtraction", "FineTune", "Individual", "IndividualNets", "Joint", "load_matching"]
