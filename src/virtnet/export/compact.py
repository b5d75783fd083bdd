"""Compact export of one route's sub-network: :func:`virtnet.nn.compact` (kept here for compatibility)."""

from virtnet.nn.compact import compact

__all__ = ["compact"]
