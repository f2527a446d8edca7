"""Building blocks shared by the CIFAR and ImageNet families (He et al. 2015, Sec. 3.2-3.3).

Attribute names follow torchvision (`conv1`, `bn1`, ..., `downsample`) so that torchvision state dicts load as
they are. `residual=False` turns any block into its plain counterpart: the same layers, no shortcut, no addition.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_lab.errors import ConfigError

Shortcut = Literal["A", "B", "C"]
SHORTCUTS: tuple[str, ...] = ("A", "B", "C")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A: a parameter-free identity that subsamples by striding and zero-pads the extra channels.

    The identity channels sit in the middle of the wider tensor (the zeros split before and after), the layout
    of the most widely used PyTorch CIFAR implementation, so that its published checkpoints load unchanged.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ConfigError(f"option A cannot shrink channels ({in_planes} -> {out_planes})")
        self.stride = stride
        self.pad_before = (out_planes - in_planes) // 2
        self.pad_after = out_planes - in_planes - self.pad_before

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels=({self.pad_before}, {self.pad_after})"


def check_shortcut(option: str) -> None:
    if option not in SHORTCUTS:
        raise ConfigError(
            f"unknown shortcut option {option!r}: choose one of {', '.join(SHORTCUTS)} "
            "(A: zero-padded identity, B: projection where the shape changes, C: projection everywhere; Sec. 3.3)"
        )


def make_shortcut(option: Shortcut, in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """The shortcut of one residual block; None means the plain identity.

    A: identity, zero-padded where the shape changes. B: a 1x1 projection + BN only where the shape changes.
    C: a projection on every block.
    """
    check_shortcut(option)
    shape_changes = stride != 1 or in_planes != out_planes
    if option == "C" or (option == "B" and shape_changes):
        return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    if option == "A" and shape_changes:
        return PadShortcut(in_planes, out_planes, stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34 and every CIFAR net)."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: Shortcut = "B",
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = make_shortcut(shortcut, in_planes, planes, stride) if residual else None

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50/101/152).

    `stride_in_1x1=True` puts the stride on the first 1x1 conv as the paper's released models do;
    False puts it on the 3x3 as torchvision does ("ResNet v1.5": more multiply-adds, slightly more accurate).
    """

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: Shortcut = "B",
        residual: bool = True,
        stride_in_1x1: bool = True,
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.residual = residual
        self.conv1 = conv1x1(in_planes, planes, stride if stride_in_1x1 else 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1 if stride_in_1x1 else stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, in_planes, out_planes, stride) if residual else None

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


Block = type[BasicBlock] | type[Bottleneck]


@torch.no_grad()
def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """He (fan-out) initialisation for convolutions, BN to identity; optionally zero each residual branch's last BN.

    Zeroing the last BN makes every residual block start as the identity (Goyal et al. 2017); it is not in the
    paper and is off by default. Plain blocks are left alone: zeroing them would cut the signal.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)) and m.residual:
                nn.init.zeros_(m.last_bn().weight)
