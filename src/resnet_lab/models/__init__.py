from resnet_lab.models.blocks import (
    BasicBlock,
    Bottleneck,
    PadShortcut,
    PreActBasicBlock,
    PreActBottleneck,
    make_shortcut,
)
from resnet_lab.models.resnet import IMAGENET_LAYOUTS, CifarResNet, ImageNetResNet, ResNet

__all__ = [
    "IMAGENET_LAYOUTS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ImageNetResNet",
    "PadShortcut",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "make_shortcut",
]
