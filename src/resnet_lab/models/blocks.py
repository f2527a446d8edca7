"""Residual units: the original ones (He et al. 2015, Sec. 3.2-3.3) and the pre-activation ones of the sequel
(He et al. 2016, "Identity Mappings in Deep Residual Networks").

A unit is one subclass of `ResidualUnit`. The trunk (`ResNet`) builds its shortcut and hands it in, as torchvision's
`_make_layer` does: `block(in_planes, planes, stride, downsample=..., residual=..., norm_layer=..., attn_layer=...,
**block_kwargs)`. The base class adds the residual branch and the shortcut and applies the ReLU after the sum (none
in a pre-activation unit); a unit builds its layers and computes its residual branch, nothing else.

Attribute names of the original units follow torchvision (`conv1`, `bn1`, ..., `downsample`) so that torchvision
state dicts load as they are. `residual=False` turns any unit into its plain counterpart: the same layers, no
shortcut, no addition.
"""

import difflib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, get_args

import torch.nn.functional as F
from torch import Tensor, nn

from resnet_lab.errors import ConfigError

Shortcut = Literal["A", "B", "C"]
SHORTCUTS: tuple[str, ...] = get_args(Shortcut)
# A callable of a channel count, e.g. `nn.BatchNorm2d`, or a class whose other arguments a config gives.
NormLayer = Callable[[int], nn.Module]
AttnLayer = Callable[[int], nn.Module]
# What the trunk passes to every unit by keyword (`block_kwargs` are the unit's own options on top).
TRUNK_KEYWORDS = ("downsample", "residual", "norm_layer", "attn_layer")
TRUNK_ARGUMENTS = ("in_planes", "planes", "stride", *TRUNK_KEYWORDS)
# The depths the papers train, by weighted layers per stage of a three-stage (CIFAR) net: for error messages.
PAPER_DEPTHS = {6: " (20, 32, 44, 56, 110, 1202...)", 9: " (164, 1001...)"}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` taking the channel count first, so that it is a `norm_layer` (a callable of the channel count)
    that a config can name: `norm_layer: {class_path: resnet_lab.models.GroupNorm, init_args: {num_groups: 8}}`.

    Args:
        num_channels: channels of the input (given by the network).
        num_groups: groups the channels are split into; must divide every width of the network.
        eps: added to the variance.
        affine: a learnt per-channel scale and shift.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True) -> None:
        if num_groups < 1 or num_channels % num_groups:
            raise ConfigError(f"GroupNorm: {num_channels} channels do not split into num_groups={num_groups} groups")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)


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


def init_layer(module: nn.Module) -> None:
    """He (fan-out) initialisation for a convolution, the identity for a norm; anything else is left as it is."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and module.weight is not None:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ResidualUnit(nn.Module):
    """What every residual unit shares: `residual_branch(x) + shortcut`, then a ReLU (Sec. 3.2), or, with
    `residual=False`, the branch alone, then the ReLU (the plain nets).

    A subclass declares, as class attributes:

    - `expansion`: output channels per `planes` (1 for a basic unit, 4 for a bottleneck);
    - `weighted_layers`: layers with weights on its residual branch, the depth rule: a net is
      `weighted_layers` x units + 2 deep (2: CIFAR depths 6n+2 and ResNet-18/34; 3: 9n+2 and ResNet-50/101/152);

    takes the trunk's arguments, `(in_planes, planes, stride=1, downsample=None, *, residual=True,
    norm_layer=nn.BatchNorm2d, attn_layer=None)`, ends its `__init__` by keeping what it is handed,
    `self.attn = attn_layer(out_channels)` (if one is given) and `self.downsample = downsample` (as torchvision's
    units keep theirs), and defines `residual_branch(x)`. It may define `zero_init_last()` (for
    `zero_init_residual`), `response_layers()` (Fig. 7) and `init_weights()`, and declare
    `takes_stride_in_1x1 = True` to be given `ImageNetResNet`'s option.
    A class that lacks a declaration is refused by the network that would use it (`check_unit`).

    `attn` (timm's `attn_layer` slot, e.g. squeeze-and-excitation) rescales the branch's output before the addition.
    """

    expansion: ClassVar[int]
    weighted_layers: ClassVar[int]
    # True: the unit normalises its own input and leaves its sum un-activated (the trunk then adds one BN-ReLU
    # before pooling, and builds a projection shortcut as a bare conv).
    pre_activation: ClassVar[bool] = False
    # True: the unit takes `stride_in_1x1` (where a bottleneck's stride sits), which `ImageNetResNet` then passes.
    takes_stride_in_1x1: ClassVar[bool] = False

    downsample: nn.Module | None
    attn: nn.Module | None

    def __init__(self, *, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        # Plain attributes until the unit assigns its modules, which then register after its own layers: the
        # module order, so the order in which a seed's weights are drawn, stays torchvision's.
        self.attn = None
        self.downsample = None

    def residual_branch(self, x: Tensor) -> Tensor:
        """F(x): the unit's layers (x is the unit's input, or in a pre-activation unit its BN-ReLU)."""
        raise NotImplementedError(f"{type(self).__name__} defines no residual_branch(x)")

    def branch_input(self, x: Tensor) -> Tensor:
        """What the residual branch reads: the unit's input itself (a pre-activation unit: its BN-ReLU)."""
        return x

    def shortcut_branch(self, x: Tensor, branch_input: Tensor) -> Tensor:
        """The shortcut: the identity, or the trunk's `downsample` where it built one."""
        return x if self.downsample is None else self.downsample(x)

    def after_addition(self, out: Tensor) -> Tensor:
        return F.relu(out, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        branch_input = self.branch_input(x)
        out = self.residual_branch(branch_input)
        if self.attn is not None:
            out = self.attn(out)
        if self.residual:
            out = out + self.shortcut_branch(x, branch_input)
        return self.after_addition(out)

    def init_weights(self) -> None:
        """He-initialise the unit's own layers, the convolutions and norms it holds directly (`conv1`, `bn1`, ...).

        Not the shortcut (the trunk initialises those it builds), nor `attn` or anything nested deeper: a module a
        fork brings keeps the initialisation its own class gives it, which its design may rely on (an SE gate's
        biases, a scale that starts at zero)."""
        for name, module in self.named_children():
            if name not in ("attn", "downsample"):
                init_layer(module)

    def zero_init_last(self) -> None:
        """Make the residual branch start at zero, so that the unit starts as the identity."""
        raise ConfigError(
            f"{type(self).__name__} does not say how its residual branch starts at zero: define zero_init_last() "
            "(e.g. zero the weight of its last norm), or set zero_init_residual false"
        )

    def response_layers(self) -> list[nn.Module]:
        """The modules whose outputs are the unit's 3x3 layers' responses (Fig. 7)."""
        raise ConfigError(
            f"{type(self).__name__} does not declare which layers Fig. 7 measures: define response_layers() "
            "returning them (after BN, before the ReLU or the addition)"
        )

    @classmethod
    def depth_of(cls, layers: Sequence[int]) -> int:
        """The depth of a net of these units with `layers` units per stage, counted as the paper counts it: every
        unit's weighted layers, the stem and the classifier."""
        return cls.weighted_layers * sum(layers) + 2

    @classmethod
    def units_per_stage(cls, depth: int, stages: int, net: str = "ResNet") -> int:
        """n, for a net of `stages` stages of n units that is `depth` deep (6n+2 for three stages of two-layer
        units); a depth no n gives is refused, naming the nearest valid ones."""
        per_stage = stages * cls.weighted_layers
        if depth >= per_stage + 2 and (depth - 2) % per_stage == 0:
            return (depth - 2) // per_stage
        below = (depth - 2) // per_stage * per_stage + 2
        nearest = [d for d in (below, below + per_stage) if d >= per_stage + 2] or [per_stage + 2]
        examples = PAPER_DEPTHS.get(per_stage, "") if stages == 3 else ""
        raise ConfigError(
            f"{net} depth with {cls.__name__} must be {per_stage}n+2 with n >= 1{examples}, got {depth}; "
            f"nearest valid: {' or '.join(map(str, nearest))}"
        )


class PreActivationUnit(ResidualUnit):
    """What the pre-activation units share: their first BN-ReLU (`bn1`, `relu`) normalises the input for the
    residual branch and for a projection shortcut alike, and the sum is left un-activated (the sequel's Fig. 4(e)),
    so that the identity path runs clean from unit to unit."""

    pre_activation = True
    bn1: nn.Module
    relu: nn.Module

    def branch_input(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(x))

    def shortcut_branch(self, x: Tensor, branch_input: Tensor) -> Tensor:
        if self.downsample is None:
            return x
        # Option A pads the identity itself; a projection reads the normalised input (the authors' code).
        return self.downsample(x if isinstance(self.downsample, PadShortcut) else branch_input)

    def after_addition(self, out: Tensor) -> Tensor:
        return out


class BasicBlock(ResidualUnit):
    """Two 3x3 convolutions, each followed by BN, a ReLU after the first (ResNet-18/34 and every 6n+2 CIFAR net)."""

    expansion = 1
    weighted_layers = 2

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        residual: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attn_layer: AttnLayer | None = None,
    ) -> None:
        super().__init__(residual=residual)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.attn = attn_layer(planes) if attn_layer is not None else None
        self.downsample = downsample

    def residual_branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def response_layers(self) -> list[nn.Module]:
        return [self.bn1, self.bn2]


class Bottleneck(ResidualUnit):
    """1x1 reduce, 3x3, 1x1 expand by 4, each followed by BN, a ReLU after the first two (ResNet-50/101/152, the
    9n+2 CIFAR nets).

    `stride_in_1x1=True` puts the stride on the first 1x1 conv as the paper's released models do;
    False puts it on the 3x3 as torchvision does ("ResNet v1.5": more multiply-adds, slightly more accurate).
    """

    expansion = 4
    weighted_layers = 3
    takes_stride_in_1x1 = True

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        residual: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attn_layer: AttnLayer | None = None,
        stride_in_1x1: bool = True,
    ) -> None:
        super().__init__(residual=residual)
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(in_planes, planes, stride if stride_in_1x1 else 1)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, 1 if stride_in_1x1 else stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = norm_layer(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.attn = attn_layer(out_planes) if attn_layer is not None else None
        self.downsample = downsample

    def residual_branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def response_layers(self) -> list[nn.Module]:
        return [self.bn2]


class PreActBasicBlock(PreActivationUnit):
    """Pre-activation basic unit: BN-ReLU-3x3, BN-ReLU-3x3, then the addition with no ReLU after it."""

    expansion = 1
    weighted_layers = 2

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        residual: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attn_layer: AttnLayer | None = None,
    ) -> None:
        super().__init__(residual=residual)
        self.bn1 = norm_layer(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.attn = attn_layer(planes) if attn_layer is not None else None
        self.downsample = downsample

    def residual_branch(self, x: Tensor) -> Tensor:
        return self.conv2(self.relu(self.bn2(self.conv1(x))))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)

    def response_layers(self) -> list[nn.Module]:
        # The 3x3 layers' outputs: with BN moved before each conv, these are what the unit adds to its input.
        return [self.conv1, self.conv2]


class PreActBottleneck(PreActivationUnit):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3 (strided), BN-ReLU-1x1 expanding by 4, then the
    addition with no ReLU after it (ResNet-164 / ResNet-1001 of the sequel)."""

    expansion = 4
    weighted_layers = 3

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        residual: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attn_layer: AttnLayer | None = None,
    ) -> None:
        super().__init__(residual=residual)
        out_planes = planes * self.expansion
        self.bn1 = norm_layer(in_planes)
        self.conv1 = conv1x1(in_planes, planes)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.attn = attn_layer(out_planes) if attn_layer is not None else None
        self.downsample = downsample

    def residual_branch(self, x: Tensor) -> Tensor:
        out = self.conv2(self.relu(self.bn2(self.conv1(x))))
        return self.conv3(self.relu(self.bn3(out)))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def response_layers(self) -> list[nn.Module]:
        return [self.conv2]


Block = type[nn.Module]  # a `ResidualUnit` subclass; typed wider so that any other is refused by `check_unit`


def unit_arguments(block: type) -> list[str]:
    """The keyword arguments `block(...)` takes: its `__init__`'s, and through `**kwargs` its parents' up to the
    first that takes none (`ResidualUnit`'s at the latest)."""
    names: list[str] = []
    for cls in block.__mro__:
        if "__init__" not in vars(cls):
            continue
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names += [p.name for p in parameters if p.kind in keywords and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters) or cls is ResidualUnit:
            break
    return names


def check_unit(block: object, block_kwargs: dict[str, Any] | None = None) -> None:
    """Refuse, in one line saying what to change, a unit class the trunk cannot build: not a `ResidualUnit`, a
    declaration missing, a trunk argument it does not take, or a `block_kwargs` key it does not take."""
    if not (isinstance(block, type) and issubclass(block, ResidualUnit)):
        what = block.__name__ if isinstance(block, type) else repr(block)
        raise ConfigError(
            f"{what} is not a residual unit: derive it from resnet_lab.models.ResidualUnit (or one of its units, "
            "e.g. BasicBlock), which adds its residual branch and its shortcut (docs/extending.md)"
        )
    name = block.__name__
    declarations = {
        "expansion": "output channels per `planes`, e.g. `expansion = 1` (basic unit) or `expansion = 4` (bottleneck)",
        "weighted_layers": "layers with weights on its residual branch, e.g. `weighted_layers = 2`: the depth rule "
        "(2: CIFAR depths 6n+2, ResNet-18/34; 3: 9n+2, ResNet-50/101/152)",
    }
    for attribute, meaning in declarations.items():
        value = getattr(block, attribute, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            said = "declares no" if value is None else f"declares {value!r} as its"
            raise ConfigError(f"{name} {said} `{attribute}`: give the class an integer attribute, {meaning}")
    if block.residual_branch is ResidualUnit.residual_branch:
        raise ConfigError(f"{name} defines no residual_branch(x): the method returning F(x), which the unit adds to x")
    takes = unit_arguments(block)
    missing = [k for k in TRUNK_KEYWORDS if k not in takes]
    if missing:
        raise ConfigError(
            f"{name}.__init__ does not take {', '.join(missing)}: a unit is built as block(in_planes, planes, stride, "
            f"{'=..., '.join(TRUNK_KEYWORDS)}=..., **block_kwargs)"
        )
    options = [k for k in takes if k not in TRUNK_ARGUMENTS]
    for key in block_kwargs or {}:
        if key in TRUNK_ARGUMENTS:
            raise ConfigError(
                f"block_kwargs key {key!r} is given to every unit by the network itself"
                + (f": set the network's own {key}" if key in ("norm_layer", "attn_layer") else "")
            )
        if key not in options:
            near = difflib.get_close_matches(key, options, n=1)
            raise ConfigError(
                f"block_kwargs key {key!r} is not an argument of {name}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; it takes: {', '.join(options) if options else 'no options of its own'}"
            )
