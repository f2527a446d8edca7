"""Residual and plain networks of the paper: the CIFAR family (Sec. 4.2) and the ImageNet family (Table 1).

Both are one trunk, `ResNet`, with a different stem, widths and stage depths. With option B the ImageNet nets
have torchvision's state-dict keys and shapes, so `torchvision.models.resnet50().state_dict()` loads strictly.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from resnet_lab.errors import ConfigError
from resnet_lab.models.blocks import BasicBlock, Block, Bottleneck, Shortcut, check_shortcut, init_weights


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
    """Stem, stages of blocks, global average pooling and a linear classifier.

    Global average pooling before the classifier lets the net run fully convolutionally on any input size.

    Args:
        block: `BasicBlock` or `Bottleneck`.
        layers: number of blocks in each stage.
        widths: base width of each stage (a bottleneck outputs 4x this).
        stem_width: output channels of the first convolution.
        stem_kernel_size: kernel of the first convolution (3 on CIFAR, 7 on ImageNet).
        stem_stride: stride of the first convolution.
        stem_pool: a 3x3 stride-2 max pool after the stem (ImageNet).
        shortcut: "A", "B" or "C" (Sec. 3.3); ignored by plain nets.
        residual: False builds the plain counterpart with the same layers and no shortcuts.
        num_classes: outputs of the classifier.
        zero_init_residual: start each residual branch's last BN at zero (not in the paper).
        stride_in_1x1: bottlenecks only: stride on the first 1x1 conv (paper) or on the 3x3 (torchvision).
        activation_checkpointing: in training, keep only each block's input and recompute the rest during
            backward: about a third of the activation memory for about a third more compute.
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
        shortcut: Shortcut,
        residual: bool,
        num_classes: int,
        zero_init_residual: bool = False,
        stride_in_1x1: bool = True,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_shortcut(shortcut)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.shortcut = shortcut
        self.residual = residual
        self.activation_checkpointing = activation_checkpointing
        self._block_kwargs = {"stride_in_1x1": stride_in_1x1} if block is Bottleneck else {}

        self.conv1 = nn.Conv2d(
            3, stem_width, stem_kernel_size, stride=stem_stride, padding=stem_kernel_size // 2, bias=False
        )
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_pool else nn.Identity()

        self.in_planes = stem_width
        self.stage_names: list[str] = []
        for i, (num_blocks, width) in enumerate(zip(layers, widths, strict=True)):
            name = f"layer{i + 1}"
            self.add_module(name, self._make_layer(block, width, num_blocks, stride=1 if i == 0 else 2))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.in_planes, num_classes)
        init_weights(self, zero_init_residual)

    def _make_layer(self, block: Block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for i in range(num_blocks):
            blocks.append(
                block(
                    self.in_planes,
                    planes,
                    stride if i == 0 else 1,
                    shortcut=self.shortcut,
                    residual=self.residual,
                    **self._block_kwargs,
                )
            )
            self.in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

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
        x = self.forward_stages(x)[-1]
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(ResNet):
    """The paper's CIFAR-10 nets (Sec. 4.2): 6n+2 weighted layers on 32x32 inputs.

    A 3x3 stem with 16 filters, three stages of n basic blocks with 16, 32 and 64 filters on 32, 16 and 8 maps,
    global average pooling and a fully connected layer.

    Args:
        depth: 6n+2 for any n >= 1: 20, 32, 44, 56, 110, 1202...
        shortcut: "A" (the paper's CIFAR choice: residual and plain nets have the same parameters), "B" or "C".
        residual: False builds the plain net of the same depth.
        num_classes: 10 for CIFAR-10, 100 for CIFAR-100 (the CLI links it to the data module).
        zero_init_residual: start each residual branch's last BN at zero (not in the paper).
        activation_checkpointing: recompute activations in backward instead of keeping them (ResNet-1202 at
            batch 128 on a small GPU).
    """

    def __init__(
        self,
        depth: int = 20,
        shortcut: Shortcut = "A",
        residual: bool = True,
        num_classes: int = 10,
        zero_init_residual: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        if depth < 8 or (depth - 2) % 6:
            below = (depth - 2) // 6 * 6 + 2
            nearest = [d for d in (below, below + 6) if d >= 8] or [8]
            raise ConfigError(
                f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202...), got {depth}; "
                f"nearest valid: {' or '.join(map(str, nearest))}"
            )
        n = (depth - 2) // 6
        super().__init__(
            BasicBlock,
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
            3.8e9 multiply-adds for ResNet-50), False on the 3x3 (torchvision's "v1.5", 4.1e9).
        zero_init_residual: start each residual branch's last BN at zero (not in the paper).
        activation_checkpointing: recompute activations in backward instead of keeping them.
    """

    def __init__(
        self,
        depth: int = 50,
        shortcut: Shortcut = "B",
        residual: bool = True,
        num_classes: int = 1000,
        stride_in_1x1: bool = True,
        zero_init_residual: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        if depth not in IMAGENET_LAYOUTS:
            raise ConfigError(
                f"ImageNet ResNet depth must be one of {', '.join(map(str, IMAGENET_LAYOUTS))} (Table 1), got {depth}"
            )
        block, layers = IMAGENET_LAYOUTS[depth]
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
            stride_in_1x1=stride_in_1x1,
            activation_checkpointing=activation_checkpointing,
        )
        self.depth = depth
