"""Deep Virtual Networks (Kim et al., CVPR 2019)."""

from virtnet.methods.common.units import check_order, level_added, level_units, rule_order, rule_orders
from virtnet.methods.common.virtual import VirtualNet, level_key
from virtnet.methods.dvn.method import DVN, DVNConfig

__all__ = [
    "DVN",
    "DVNConfig",
    "VirtualNet",
    "check_order",
    "level_added",
    "level_key",
    "level_units",
    "rule_order",
    "rule_orders",
]
