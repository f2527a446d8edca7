"""Residual units: the original ones (He et al. 2015, Sec. 3.2-3.3) and the pre-activation ones of the sequel
(He et al. 2016, "Identity Mappings in Deep Residual Networks").

A unit is one class. The trunk (`ResNet`) builds every unit as `block(in_planes, planes, stride, shortcut=...,
residual=..., norm_layer=..., **block_kwargs)` and asks each, by duck typing, for what only the unit knows:

- `expansion`: output channels per `planes`; `weighted_layers`: convolutions on the residual branch (so that
  the CIFAR nets know their depth rule: 2 gives 6n+2, 3 gives 9n+2);
- `pre_activation`: True if the unit normalises its own input and leaves its output un-activated (the trunk then
  adds one BN-ReLU before pooling);
- `zero_init_last()`: make the residual branch start at zero, so the unit starts as the identity;
- `response_layers()`: the modules whose outputs are its 3x3 layers' responses (Fig. 7).

Attribute names of the original units follow torchvision (`conv1`, `bn1`, ..., `downsample`) so that torchvision
state dicts load as they are. `residual=False` turns any unit into its plain counterpart: the same layers, no
shortcut, no addition.
"""

from collections.abc import Callable
from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor, nn

from resnet_lab.errors import ConfigError

Shortcut = Literal["A", "B", "C"]
SHORTCUTS: tuple[str, ...] = get_args(Shortcut)
NormLayer = Callable[[int], nn.Module]


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


def check_shortcut(option: "str | type[nn.Module]") -> None:
    if not isinstance(option, type) and option not in SHORTCUTS:
        raise ConfigError(
            f"unknown shortcut option {option!r}: choose one of {', '.join(SHORTCUTS)} "
            "(A: zero-padded identity, B: projection where the shape changes, C: projection everywhere; Sec. 3.3)"
        )


def make_shortcut(
    option: "Shortcut | type[nn.Module]",
    in_planes: int,
    out_planes: int,
    stride: int,
    norm_layer: NormLayer | None = nn.BatchNorm2d,
) -> nn.Module | None:
    """The shortcut of one residual unit; None means the plain identity.

    A: identity, zero-padded where the shape changes. B: a 1x1 projection only where the shape changes.
    C: a projection on every unit. A projection is conv + norm, or the conv alone with `norm_layer=None`
    (the pre-activation units, whose projection takes the already normalised input). A class (a fork's own
    shortcut) is built on every unit as `option(in_planes, out_planes, stride)`.
    """
    if isinstance(option, type):
        return option(in_planes, out_planes, stride)
    shape_changes = stride != 1 or in_planes != out_planes
    if option == "C" or (option == "B" and shape_changes):
        conv = conv1x1(in_planes, out_planes, stride)
        return conv if norm_layer is None else nn.Sequential(conv, norm_layer(out_planes))
    if option == "A" and shape_changes:
        return PadShortcut(in_planes, out_planes, stride)
    check_shortcut(option)  # the plain identity, unless the letter is unknown
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, each followed by BN; ReLU after the first and after the addition (ResNet-18/34 and
    every 6n+2 CIFAR net)."""

    expansion = 1
    weighted_layers = 2
    pre_activation = False

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: Shortcut | type[nn.Module] = "B",
        residual: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = make_shortcut(shortcut, in_planes, planes, stride, norm_layer) if residual else None

    def zero_init_last(self) -> None:
        if self.residual:
            nn.init.zeros_(self.bn2.weight)

    def response_layers(self) -> list[nn.Module]:
        return [self.bn1, self.bn2]

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4, each followed by BN (ResNet-50/101/152, the 9n+2 CIFAR nets).

    `stride_in_1x1=True` puts the stride on the first 1x1 conv as the paper's released models do;
    False puts it on the 3x3 as torchvision does ("ResNet v1.5": more multiply-adds, slightly more accurate).
    """

    expansion = 4
    weighted_layers = 3
    pre_activation = False

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: Shortcut | type[nn.Module] = "B",
        residual: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        stride_in_1x1: bool = True,
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.residual = residual
        self.conv1 = conv1x1(in_planes, planes, stride if stride_in_1x1 else 1)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, 1 if stride_in_1x1 else stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = norm_layer(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, in_planes, out_planes, stride, norm_layer) if residual else None

    def zero_init_last(self) -> None:
        if self.residual:
            nn.init.zeros_(self.bn3.weight)

    def response_layers(self) -> list[nn.Module]:
        return [self.bn2]

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class _PreActivation(nn.Module):
    """What the two pre-activation units share: the shortcut taken from the unit's input, and the output left
    un-activated (the sequel's Fig. 4(e)), so that the identity path runs clean from unit to unit."""

    pre_activation = True
    downsample: nn.Module | None

    def _shortcut(
        self, option: Shortcut | type[nn.Module], in_planes: int, out_planes: int, stride: int
    ) -> nn.Module | None:
        # A projection shares the unit's BN-ReLU with the residual branch, so it is a bare conv (the authors' code).
        return make_shortcut(option, in_planes, out_planes, stride, norm_layer=None) if self.residual else None

    def _add_shortcut(self, out: Tensor, x: Tensor, activated: Tensor) -> Tensor:
        if not self.residual:
            return out
        if self.downsample is None:
            return out + x
        # Option A pads the identity itself; a projection reads the normalised input.
        return out + self.downsample(x if isinstance(self.downsample, PadShortcut) else activated)


class PreActBasicBlock(_PreActivation):
    """Pre-activation basic unit: BN-ReLU-3x3, BN-ReLU-3x3, then the addition with no ReLU after it."""

    expansion = 1
    weighted_layers = 2

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: Shortcut | type[nn.Module] = "B",
        residual: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.bn1 = norm_layer(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = self._shortcut(shortcut, in_planes, planes, stride)

    def zero_init_last(self) -> None:
        if self.residual:
            nn.init.zeros_(self.conv2.weight)

    def response_layers(self) -> list[nn.Module]:
        # The 3x3 layers' outputs: with BN moved before each conv, these are what the unit adds to its input.
        return [self.conv1, self.conv2]

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        return self._add_shortcut(out, x, activated)


class PreActBottleneck(_PreActivation):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3 (strided), BN-ReLU-1x1 expanding by 4, then the
    addition with no ReLU after it (ResNet-164 / ResNet-1001 of the sequel)."""

    expansion = 4
    weighted_layers = 3

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: Shortcut | type[nn.Module] = "B",
        residual: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.residual = residual
        self.bn1 = norm_layer(in_planes)
        self.conv1 = conv1x1(in_planes, planes)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = self._shortcut(shortcut, in_planes, out_planes, stride)

    def zero_init_last(self) -> None:
        if self.residual:
            nn.init.zeros_(self.conv3.weight)

    def response_layers(self) -> list[nn.Module]:
        return [self.conv2]

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        out = self.conv3(self.relu(self.bn3(out)))
        return self._add_shortcut(out, x, activated)


Block = type[nn.Module]


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """He (fan-out) initialisation for convolutions, norms to identity; optionally each unit's `zero_init_last()`.

    Zeroing the residual branch makes every unit start as the identity (Goyal et al. 2017); it is not in the
    paper and is off by default. Plain units ignore it: zeroing them would cut the signal.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if m is not model and callable(getattr(m, "zero_init_last", None)):
                m.zero_init_last()
