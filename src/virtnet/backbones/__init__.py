"""Backbones: shared trunks, task-specific stems and heads, and the backbone registry.

A multi-task network is ``stem[task] -> trunk -> head[task]`` (:class:`MultiTaskNet`). Trunks:
:class:`ResNet` (CIFAR and ImageNet layouts), :class:`WideResNet`, :class:`VGG`, :class:`SimpleConvNet`
and :class:`ResNet26`; :func:`build_multitask` builds one from a :class:`BackboneConfig`.
See ``docs/backbones.md`` for the exact layouts.
"""

from virtnet.backbones.base import (
    Backbone,
    MultiTaskNet,
    Partitions,
    Stem,
    TaskNet,
    TaskSpec,
    conv_bn,
    init_weights,
    scale_width,
    stem_stride,
)
from virtnet.backbones.registry import (
    MIN_FEATURE_SIZE,
    BackboneConfig,
    BackboneName,
    backbone_names,
    build_backbone,
    build_multitask,
    default_feature_size,
    get_backbone_class,
)
from virtnet.backbones.resnet import BasicBlock, ResNet, make_stage
from virtnet.backbones.resnet26 import ResNet26
from virtnet.backbones.simple import SimpleConvNet
from virtnet.backbones.vgg import VGG, VGG_CONFIGS, ConvBNReLU, LinearBNReLU
from virtnet.backbones.wrn import PreActBlock, WideResNet

__all__ = [
    "MIN_FEATURE_SIZE",
    "VGG",
    "VGG_CONFIGS",
    "Backbone",
    "BackboneConfig",
    "BackboneName",
    "BasicBlock",
    "ConvBNReLU",
    "LinearBNReLU",
    "MultiTaskNet",
    "Partitions",
    "PreActBlock",
    "ResNet",
    "ResNet26",
    "SimpleConvNet",
    "Stem",
    "TaskNet",
    "TaskSpec",
    "WideResNet",
    "backbone_names",
    "build_backbone",
    "build_multitask",
    "conv_bn",
    "default_feature_size",
    "get_backbone_class",
    "init_weights",
    "make_stage",
    "scale_width",
    "stem_stride",
]
