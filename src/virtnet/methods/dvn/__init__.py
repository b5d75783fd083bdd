"""Deep Virtual Networks (Kim et al., CVPR 2019), with NestedNet and grouped PackNet on the same units."""

from virtnet.methods.dvn.method import DVN, DVNConfig, GroupedPackNet, NestedNet
from virtnet.methods.dvn.model import VirtualNet, level_key
from virtnet.methods.dvn.units import check_order, level_added, level_units, rule_order, rule_orders

__all__ = [
    "DVN",
    "DVNConfig",
    "GroupedPackNet",
    "NestedNet",
    "VirtualNet",
    "check_order",
    "level_added",
    "level_key",
    "level_units",
    "rule_order",
    "rule_orders",
]
