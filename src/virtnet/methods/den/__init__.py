"""Deep Elastic Networks (Ahn, Kim, Oh; ICCV 2019): an estimator of elastic blocks and a selector that
picks a compact structure per instance, run by a grouped path that really executes less."""

from virtnet.methods.den.blocks import ElasticBlock, ElasticPair, ElasticPreAct, ElasticResidual, LevelNorm
from virtnet.methods.den.config import DENConfig
from virtnet.methods.den.method import DEN, instance_loss, reinforce_loss, rewards, sparsity
from virtnet.methods.den.model import DENTaskNet, ElasticNet
from virtnet.methods.den.selector import (
    BudgetPlan,
    Selector,
    greedy,
    initial_structures,
    log_probs,
    sample,
    structure_log_prob,
    top_k,
)

__all__ = [
    "DEN",
    "BudgetPlan",
    "DENConfig",
    "DENTaskNet",
    "ElasticBlock",
    "ElasticNet",
    "ElasticPair",
    "ElasticPreAct",
    "ElasticResidual",
    "LevelNorm",
    "Selector",
    "greedy",
    "initial_structures",
    "instance_loss",
    "log_probs",
    "reinforce_loss",
    "rewards",
    "sample",
    "sparsity",
    "structure_log_prob",
    "top_k",
]
