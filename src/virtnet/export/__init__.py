"""Compact export of sub-networks, and saving/loading exported networks."""

from virtnet.export.compact import compact

__all__ = ["compact"]
