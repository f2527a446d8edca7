from resnet_lab.models.blocks import (
    BasicBlock,
    Bottleneck,
    GroupNorm,
    PadShortcut,
    PreActBasicBlock,
    PreActBottleneck,
    PreActivationUnit,
    ResidualUnit,
    make_shortcut,
)
from resnet_lab.models.resnet import IMAGENET_LAYOUTS, CifarResNet, ImageNetResNet, ResNet

__all__ = [
    "IMAGENET_LAYOUTS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "GroupNorm",
    "ImageNetResNet",
    "PadShortcut",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActivationUnit",
    "ResNet",
    "ResidualUnit",
    "make_shortcut",
]
