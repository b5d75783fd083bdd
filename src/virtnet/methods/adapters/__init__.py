"""Residual adapters (Rebuffi, Bilen, Vedaldi, CVPR 2018; NIPS 2017): series and parallel adapters on a
frozen universal network, placements, cross-domain SVD compression and the decathlon score.

Registers the method ``adapters``. The reusable layers (and parallel adapters for any ``nn.Module``) are
in :mod:`virtnet.nn.adapters`.
"""

from virtnet.methods.adapters.compression import compress_adapters, joint_fraction, single_fraction
from virtnet.methods.adapters.config import PAPER_SIZE_GROUPS, AdaptersConfig, size_group_decay
from virtnet.methods.adapters.method import Adapters
from virtnet.methods.adapters.model import (
    PLACEMENTS,
    AdapterNet,
    DomainNetwork,
    InputLayer,
    block_stages,
    build_adapter_net,
    placement_layers,
    source_of,
)
from virtnet.methods.adapters.score import DecathlonScore, decathlon_score

__all__ = [
    "PAPER_SIZE_GROUPS",
    "PLACEMENTS",
    "AdapterNet",
    "Adapters",
    "AdaptersConfig",
    "DomainNetwork",
    "DecathlonScore",
    "InputLayer",
    "block_stages",
    "build_adapter_net",
    "compress_adapters",
    "decathlon_score",
    "joint_fraction",
    "placement_layers",
    "single_fraction",
    "size_group_decay",
    "source_of",
]
