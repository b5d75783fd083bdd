"""NestedNet (DVN's baseline): nested levels of one shared unit order."""

from virtnet.methods.nestednet.method import NestedNet, NestedNetConfig

__all__ = ["NestedNet", "NestedNetConfig"]
