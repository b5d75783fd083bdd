"""Feature extraction: a new classifier on frozen features."""

from virtnet.methods.feature_extraction.method import FeatureExtraction

__all__ = ["FeatureExtraction"]
