"""Fully-adaptive feature sharing (automatic branching): a thin multi-task VGG widened top down into a
tree of task branches (Lu et al., CVPR 2017)."""

from virtnet.methods.branching.config import BranchingConfig
from virtnet.methods.branching.method import Branching
from virtnet.methods.branching.model import BranchingNet

__all__ = ["Branching", "BranchingConfig", "BranchingNet"]
