"""Joint training: one shared trunk, a stem and a head per task."""

from virtnet.methods.joint.method import Joint, JointConfig

__all__ = ["Joint", "JointConfig"]
