"""Sequential fine-tuning."""

from virtnet.methods.finetune.method import FineTune

__all__ = ["FineTune"]
