"""Individual networks: one separate network per task (no parameter shared)."""

from virtnet.methods.individual.method import Individual, IndividualConfig, IndividualNets

__all__ = ["Individual", "IndividualConfig", "IndividualNets"]
