"""Residual and plain networks of the paper: the CIFAR family (Sec. 4.2) and the ImageNet family (Table 1).

Both are one trunk, `ResNet`, with a different stem, widths and stage depths. With option B the ImageNet nets
have torchvision's state-dict keys and shapes, so `torchvision.models.resnet50().state_dict()` loads strictly.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from resnet_lab.errors import ConfigError
from resnet_lab.models.blocks import (
    AttnLayer,
    BasicBlock,
    Block,
    Bottleneck,
    NormLayer,
    ResidualUnit,
    Shortcut,
    check_shortcut,
    check_unit,
    init_layer,
    make_shortcut,
)


@contextmanager
def frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """Momentum 0 for every BN of `module`: batch statistics still normalise, running statistics stay put."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


def checkpointed(block: nn.Module, x: Tensor) -> Tensor:
    """Run `block` without keeping its activations; backward recomputes them, leaving BN statistics alone."""
    calls = 0

    def run(inputs: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return block(inputs)
        with frozen_bn_statistics(block):  # the recomputation: its batch statistics were already counted
            return block(inputs)

    return checkpoint(run, x, use_reentrant=False)


class ResNet(nn.Module):
    """Stem, stages of residual units, global average pooling and a linear classifier.

    Global average pooling before the classifier lets the net run fully convolutionally on any input size. The
    trunk builds each unit's shortcut and hands it in, `block(in_planes, planes, stride, downsample=, residual=,
    norm_layer=, attn_layer=, **block_kwargs)`; what differs between units (depth rule, zero-init, Fig. 7's layers,
    pre-activation) is declared by the unit class, so a new unit is one class (see `resnet_lab.models.blocks`). With
    a pre-activation unit the net ends in one BN-ReLU before pooling, and a stem without a max pool has no BN-ReLU of
    its own: the first unit normalises its output.

    Args:
        block: the unit class, e.g. `BasicBlock`, `Bottleneck`, `PreActBasicBlock`, `PreActBottleneck`.
        layers: number of units in each stage.
        widths: base width of each stage (a unit outputs `block.expansion` times this).
        stem_width: output channels of the first convolution.
        stem_kernel_size: kernel of the first convolution (3 on CIFAR, 7 on ImageNet).
        stem_stride: stride of the first convolution.
        stem_pool: a 3x3 stride-2 max pool after the stem (ImageNet).
        shortcut: "A", "B" or "C" (Sec. 3.3), or a shortcut class built on every unit as
            `shortcut(in_planes, out_planes, stride)`; ignored by plain nets.
        residual: False builds the plain counterpart with the same layers and no shortcuts.
        num_classes: outputs of the classifier.
        zero_init_residual: start each residual branch at zero (`zero_init_last()` of each unit; not in the paper).
        norm_layer: builds a normalisation layer from a channel count (default BN).
        attn_layer: builds a module from a unit's output channels that rescales its residual branch before the
            addition (e.g. squeeze-and-excitation); None: none.
        block_kwargs: further keyword arguments of every unit, e.g. `{"stride_in_1x1": False}` for `Bottleneck`.
        activation_checkpointing: in training, keep only each unit's input and recompute the rest during
            backward: much less activation memory for about a third more compute (docs/benchmarks.md).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        stem_width: int,
        stem_kernel_size: int,
        stem_stride: int,
        stem_pool: bool,
        shortcut: Shortcut | type[nn.Module],
        residual: bool,
        num_classes: int,
        zero_init_residual: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attn_layer: AttnLayer | None = None,
        block_kwargs: dict[str, Any] | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_shortcut(shortcut)
        check_unit(block, block_kwargs)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.shortcut = shortcut
        self.residual = residual
        self.activation_checkpointing = activation_checkpointing
        self.block_kwargs = dict(block_kwargs or {})
        pre_activation = block.pre_activation

        self.conv1 = nn.Conv2d(
            3, stem_width, stem_kernel_size, stride=stem_stride, padding=stem_kernel_size // 2, bias=False
        )
        # The authors' pre-activation code keeps the ImageNet stem's BN-ReLU (its max pool needs an activated input).
        stem_norm = stem_pool or not pre_activation
        self._stem_response = "bn1" if stem_norm else "conv1"
        self.bn1 = norm_layer(stem_width) if stem_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if stem_norm else nn.Identity()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_pool else nn.Identity()

        self.in_planes = stem_width
        self.stage_names: list[str] = []
        for i, (num_blocks, width) in enumerate(zip(layers, widths, strict=True)):
            name = f"layer{i + 1}"
            stage = self._make_layer(block, width, num_blocks, 1 if i == 0 else 2, norm_layer, attn_layer)
            self.add_module(name, stage)
            self.stage_names.append(name)
        # A pre-activation net's last unit leaves its sum un-normalised: one BN-ReLU before pooling.
        self.final_norm = norm_layer(self.in_planes) if pre_activation else nn.Identity()
        self.final_relu = nn.ReLU(inplace=True) if pre_activation else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.in_planes, num_classes)
        self.init_weights(zero_init_residual)

    def _make_layer(
        self,
        block: type[ResidualUnit],
        planes: int,
        num_blocks: int,
        stride: int,
        norm_layer: NormLayer,
        attn_layer: AttnLayer | None,
    ) -> nn.Sequential:
        # A pre-activation unit's BN-ReLU is shared by its branch and a projection: the projection is a bare conv.
        shortcut_norm = None if block.pre_activation else norm_layer
        units = []
        for i in range(num_blocks):
            unit_stride = stride if i == 0 else 1
            out_planes = planes * block.expansion
            downsample = (
                make_shortcut(self.shortcut, self.in_planes, out_planes, unit_stride, shortcut_norm)
                if self.residual
                else None
            )
            unit = block(
                self.in_planes,
                planes,
                unit_stride,
                downsample=downsample,
                residual=self.residual,
                norm_layer=norm_layer,
                attn_layer=attn_layer,
                **self.block_kwargs,
            )
            if unit.downsample is not downsample:
                raise ConfigError(
                    f"{block.__name__} does not keep the shortcut it is handed: end its __init__ with "
                    "`self.downsample = downsample` (ResidualUnit adds it to the residual branch)"
                )
            if attn_layer is not None and unit.attn is None:
                raise ConfigError(
                    f"{block.__name__} ignores attn_layer: build it in __init__ as `self.attn = "
                    "attn_layer(out_channels)` (ResidualUnit applies it to the residual branch)"
                )
            units.append(unit)
            self.in_planes = out_planes
        return nn.Sequential(*units)

    def init_weights(self, zero_init_residual: bool = False) -> None:
        """He (fan-out) initialisation for convolutions, norms to identity, in module order (so that a seed gives
        the weights it always has); then, optionally, each residual unit's `zero_init_last()`.

        Inside a unit only its own layers (`ResidualUnit.init_weights`) and the projections the trunk built for
        options B and C are re-initialised: a module a fork brings (the `attn` module, layers nested in a unit, a
        shortcut class) keeps its own class's initialisation, which its design may rely on. Zeroing the residual
        branch makes every unit start as the identity (Goyal et al. 2017); it is not in the paper and is off by
        default. Plain units ignore it: zeroing them would cut the signal.
        """
        trunk_shortcuts = not isinstance(self.shortcut, type)

        def visit(module: nn.Module) -> None:
            if isinstance(module, ResidualUnit):
                module.init_weights()
                if trunk_shortcuts and module.downsample is not None:
                    for layer in module.downsample.modules():
                        init_layer(layer)
                return
            init_layer(module)
            for child in module.children():
                visit(child)

        visit(self)
        if zero_init_residual:
            for unit in self.modules():
                if isinstance(unit, ResidualUnit) and unit.residual:
                    unit.zero_init_last()

    def response_layers(self) -> list[nn.Module]:
        """The modules whose outputs are the 3x3 layers' responses of Fig. 7, in network order: the stem's (after its
        BN, or the conv itself without one) if it is a 3x3, then each unit's own."""
        layers = [getattr(self, self._stem_response)] if self.conv1.kernel_size == (3, 3) else []
        for name in self.stage_names:
            for unit in getattr(self, name):
                layers += unit.response_layers()
        return layers

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Every stage's output feature map, for forks that build detectors or segmenters on top."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for name in self.stage_names:
            stage = getattr(self, name)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                for block in stage:
                    x = checkpointed(block, x)
            else:
                x = stage(x)
            features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        x = self.final_relu(self.final_norm(self.forward_stages(x)[-1]))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(ResNet):
    """The CIFAR nets: a 3x3 stem with 16 filters, three stages of n units on 32, 16 and 8 maps, global average
    pooling and a fully connected layer.

    With basic units (the paper, Sec. 4.2) the stages have 16, 32 and 64 filters and the depth is 6n+2; with
    bottleneck units (the sequel) they output 64, 128 and 256 (bottleneck widths 16, 32, 64) and the depth is 9n+2.

    Args:
        depth: 6n+2 for two-layer units (20, 32, 44, 56, 110, 1202...), 9n+2 for three-layer ones (164, 1001...).
        shortcut: "A" (the paper's CIFAR choice: residual and plain nets have the same parameters), "B" or "C".
        residual: False builds the plain net of the same depth.
        num_classes: 10 for CIFAR-10, 100 for CIFAR-100 (the CLI links it to the data module).
        zero_init_residual: start each residual branch at zero (not in the paper).
        activation_checkpointing: recompute activations in backward instead of keeping them (ResNet-1202 at
            batch 128 on a small GPU).
        block: the unit class (`BasicBlock`, `Bottleneck`, `PreActBasicBlock`, `PreActBottleneck`, or a fork's own).
        block_kwargs: further keyword arguments of every unit.
        norm_layer: builds a normalisation layer from a channel count: a class such as `torch.nn.BatchNorm2d` (the
            default), or one with further arguments, e.g. `resnet_lab.models.GroupNorm` with `num_groups`.
        attn_layer: builds a module from a unit's output channels that rescales its residual branch before the
            addition (e.g. squeeze-and-excitation, docs/extending.md); None: none.
    """

    def __init__(
        self,
        depth: int = 20,
        shortcut: Shortcut | type[nn.Module] = "A",
        residual: bool = True,
        num_classes: int = 10,
        zero_init_residual: bool = False,
        activation_checkpointing: bool = False,
        block: Block = BasicBlock,
        block_kwargs: dict[str, Any] | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attn_layer: AttnLayer | None = None,
    ) -> None:
        check_unit(block, block_kwargs)
        n = block.units_per_stage(depth, stages=3, net="CIFAR ResNet")
        super().__init__(
            block,
            layers=[n, n, n],
            widths=[16, 32, 64],
            stem_width=16,
            stem_kernel_size=3,
            stem_stride=1,
            stem_pool=False,
            shortcut=shortcut,
            residual=residual,
            num_classes=num_classes,
            zero_init_residual=zero_init_residual,
            norm_layer=norm_layer,
            attn_layer=attn_layer,
            block_kwargs=block_kwargs,
            activation_checkpointing=activation_checkpointing,
        )
        self.depth = depth


# Table 1: block type and blocks per stage for each depth.
IMAGENET_LAYOUTS: dict[int, tuple[Block, tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ImageNetResNet(ResNet):
    """The paper's ImageNet nets (Table 1): a 7x7 stride-2 stem, max pool, four stages of 64-512 filters.

    Args:
        depth: 18 or 34 (basic blocks), 50, 101 or 152 (bottlenecks).
        shortcut: "B" (the paper's choice for 50/101/152; torchvision's layout), "A" or "C" (Table 3).
        residual: False builds the plain net of the same depth (Table 2).
        num_classes: 1000 for ImageNet-1k (the CLI links it to the data module).
        stride_in_1x1: where a bottleneck's stride sits: True on the first 1x1 conv (the paper's released models,
            3.8e9 multiply-adds for ResNet-50), False on the 3x3 (torchvision's "v1.5", 4.1e9). Given to the units
            that declare `takes_stride_in_1x1` (`Bottleneck`); the others have no such choice (the basic units, and
            `PreActBottleneck`, which strides its 3x3 as the authors' code does).
        zero_init_residual: start each residual branch's last BN at zero (not in the paper).
        activation_checkpointing: recompute activations in backward instead of keeping them.
        block: the unit class; None: Table 1's (`BasicBlock` for 18/34, `Bottleneck` for 50/101/152). Another
            one must have as many layers per unit (e.g. `PreActBottleneck` for 50/101/152).
        block_kwargs: further keyword arguments of every unit (`stride_in_1x1` is the network's own argument).
        norm_layer: builds a normalisation layer from a channel count: a class such as `torch.nn.BatchNorm2d` (the
            default), or one with further arguments, e.g. `resnet_lab.models.GroupNorm` with `num_groups`.
        attn_layer: builds a module from a unit's output channels that rescales its residual branch before the
            addition (e.g. squeeze-and-excitation, docs/extending.md); None: none.
    """

    def __init__(
        self,
        depth: int = 50,
        shortcut: Shortcut | type[nn.Module] = "B",
        residual: bool = True,
        num_classes: int = 1000,
        stride_in_1x1: bool = True,
        zero_init_residual: bool = False,
        activation_checkpointing: bool = False,
        block: Block | None = None,
        block_kwargs: dict[str, Any] | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        attn_layer: AttnLayer | None = None,
    ) -> None:
        if depth not in IMAGENET_LAYOUTS:
            raise ConfigError(
                f"ImageNet ResNet depth must be one of {', '.join(map(str, IMAGENET_LAYOUTS))} (Table 1), got {depth}"
            )
        default_block, layers = IMAGENET_LAYOUTS[depth]
        block = block or default_block
        block_kwargs = dict(block_kwargs or {})
        if "stride_in_1x1" in block_kwargs:
            raise ConfigError("block_kwargs key 'stride_in_1x1' is ImageNetResNet's own argument: set stride_in_1x1")
        check_unit(block, block_kwargs)
        if block.depth_of(layers) != depth:
            raise ConfigError(
                f"ImageNet ResNet-{depth} is built of {default_block.weighted_layers}-layer units (Table 1); "
                f"{block.__name__} has {block.weighted_layers}"
            )
        if block.takes_stride_in_1x1:
            block_kwargs["stride_in_1x1"] = stride_in_1x1
        super().__init__(
            block,
            layers=layers,
            widths=[64, 128, 256, 512],
            stem_width=64,
            stem_kernel_size=7,
            stem_stride=2,
            stem_pool=True,
            shortcut=shortcut,
            residual=residual,
            num_classes=num_classes,
            zero_init_residual=zero_init_residual,
            norm_layer=norm_layer,
            attn_layer=attn_layer,
            block_kwargs=block_kwargs or None,
            activation_checkpointing=activation_checkpointing,
        )
        self.depth = depth
