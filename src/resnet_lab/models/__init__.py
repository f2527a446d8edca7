from resnet_lab.models.blocks import BasicBlock, Bottleneck, PadShortcut, make_shortcut
from resnet_lab.models.resnet import IMAGENET_LAYOUTS, CifarResNet, ImageNetResNet, ResNet

__all__ = [
    "IMAGENET_LAYOUTS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ImageNetResNet",
    "PadShortcut",
    "ResNet",
    "make_shortcut",
]
