"""Grouped PackNet ("PackNet+", DVN's baseline)."""

from virtnet.methods.packnet_grouped.method import GroupedPackNet, GroupedPackNetConfig

__all__ = ["GroupedPackNet", "GroupedPackNetConfig"]
