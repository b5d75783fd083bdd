"""Learning without Forgetting (Li & Hoiem, ECCV 2016)."""

from virtnet.methods.lwf.method import LwF, LwFConfig

__all__ = ["LwF", "LwFConfig"]
