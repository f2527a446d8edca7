import copy
import operator
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from resnet_lab.errors import ConfigError
from resnet_lab.models import (
    Bottleneck,
    CifarResNet,
    ImageNetResNet,
    PadShortcut,
    PreActBasicBlock,
    PreActBottleneck,
)

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
IMAGENET_DEPTHS = (18, 34, 50, 101, 152)
# Paper Table 6 (option A) and torchvision (option B), in millions of parameters.
CIFAR_PARAMS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}
IMAGENET_PARAMS = {18: 11.69, 34: 21.80, 50: 25.56, 101: 44.55, 152: 60.19}
# Multiply-adds per image: Table 1 (224x224, stride on the bottleneck's 1x1) and PAPER.md for CIFAR (32x32).
IMAGENET_GMACS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}
CIFAR_MMACS = {20: 41, 32: 69, 44: 97, 56: 126, 110: 253}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def multiply_adds(model_fn, size: int) -> float:
    # On the meta device: shapes alone, so counting even ResNet-152 costs no compute.
    with torch.device("meta"):
        model, x = model_fn(), torch.empty(1, 3, size, size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("depth", CIFAR_DEPTHS)
def test_cifar_parameter_counts_match_table6(depth):
    assert round(n_params(CifarResNet(depth)) / 1e6, 2 if depth < 110 else 1) == CIFAR_PARAMS[depth]


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_imagenet_parameter_counts_match_torchvision(depth):
    assert round(n_params(ImageNetResNet(depth)) / 1e6, 2) == IMAGENET_PARAMS[depth]


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_imagenet_multiply_adds_match_table1(depth):
    macs = multiply_adds(lambda: ImageNetResNet(depth), 224) / 1e9
    assert macs == pytest.approx(IMAGENET_GMACS[depth], rel=0.02)


def test_stride_placement_changes_resnet50_cost():
    # torchvision's v1.5 strides the 3x3: 4.09e9 multiply-adds against the paper's 3.86e9.
    assert multiply_adds(lambda: ImageNetResNet(50, stride_in_1x1=False), 224) / 1e9 == pytest.approx(4.09, abs=0.01)


@pytest.mark.parametrize("depth", CIFAR_MMACS)
def test_cifar_multiply_adds(depth):
    assert multiply_adds(lambda: CifarResNet(depth), 32) / 1e6 == pytest.approx(CIFAR_MMACS[depth], rel=0.02)


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_torchvision_state_dict_loads_and_logits_match(depth):
    reference = getattr(torchvision.models, f"resnet{depth}")().eval()
    ours = ImageNetResNet(depth, shortcut="B", stride_in_1x1=False).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)
    # The paper's stride placement has the same keys and shapes, so the same weights load into it as well.
    ImageNetResNet(depth, shortcut="B").load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize("family,depth", [("cifar", 20), ("cifar", 56), ("imagenet", 18), ("imagenet", 50)])
def test_option_a_adds_no_parameters_and_b_c_add_exactly_the_projections(family, depth):
    build = CifarResNet if family == "cifar" else ImageNetResNet
    plain, a, b, c = (build(depth, residual=False), build(depth, "A"), build(depth, "B"), build(depth, "C"))
    assert n_params(a) == n_params(plain)

    def projection_params(model: nn.Module) -> int:
        return sum(
            n_params(m.downsample)
            for m in model.modules()
            if getattr(m, "downsample", None) is not None and not isinstance(m.downsample, PadShortcut)
        )

    assert projection_params(a) == 0
    for model in (b, c):
        assert n_params(model) - n_params(plain) == projection_params(model) > 0
        for block in model.modules():
            if getattr(block, "downsample", None) is not None:
                conv, bn = block.downsample
                assert conv.kernel_size == (1, 1) and isinstance(bn, nn.BatchNorm2d)
    # B projects exactly where the shape changes; C on every block.
    for block in (m for m in b.modules() if hasattr(m, "downsample")):
        stride = max(block.conv1.stride[0], block.conv2.stride[0])
        shape_changes = stride > 1 or block.conv1.in_channels != getattr(block, "conv3", block.conv2).out_channels
        assert (block.downsample is not None) == shape_changes
    assert all(block.downsample is not None for block in c.modules() if hasattr(block, "downsample"))


def count_additions(model: nn.Module) -> int:
    graph = fx.symbolic_trace(model).graph
    return sum(node.target in (operator.add, operator.iadd, torch.add) for node in graph.nodes)


@pytest.mark.parametrize("build", [lambda r: CifarResNet(20, residual=r), lambda r: ImageNetResNet(50, residual=r)])
def test_plain_nets_contain_no_additions(build):
    assert count_additions(build(False)) == 0
    residual = build(True)
    assert count_additions(residual) == sum(1 for _ in residual.modules() if hasattr(_, "downsample"))


def test_option_a_pads_zero_channels_around_the_identity():
    shortcut = PadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    assert n_params(shortcut) == 0


@pytest.mark.parametrize("depth", (20, 32, 44, 56, 110))
@pytest.mark.parametrize("shortcut", ("A", "B", "C"))
@pytest.mark.parametrize("residual", (True, False))
def test_cifar_forward_backward(depth, shortcut, residual):
    model = CifarResNet(depth, shortcut=shortcut, residual=residual, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cifar_1202_forward_backward():
    model = CifarResNet(1202)
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    assert model.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
@pytest.mark.parametrize("shortcut,residual", [("A", True), ("B", True), ("C", True), ("B", False)])
def test_imagenet_forward_backward_any_input_size(depth, shortcut, residual):
    model = ImageNetResNet(depth, shortcut=shortcut, residual=residual, num_classes=7)
    out = model(torch.randn(2, 3, 64, 80))  # global average pooling: any input size
    assert out.shape == (2, 7)
    out.sum().backward()
    assert model.conv1.weight.grad is not None


def test_forward_stages_returns_every_stage():
    model = ImageNetResNet(50)
    features = model.forward_stages(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in features] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    cifar = CifarResNet(20).forward_stages(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in cifar] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_he_init_and_optional_zero_init_of_last_bn():
    model = CifarResNet(20)
    conv = model.layer2[1].conv1  # 32 filters of 3x3: fan_out = 288
    assert conv.weight.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.1)
    assert all(block.bn2.weight.eq(1).all() for block in model.layer1)
    zeroed = CifarResNet(20, zero_init_residual=True)
    assert all(not block.bn2.weight.any() for stage in (zeroed.layer1, zeroed.layer2, zeroed.layer3) for block in stage)
    assert all(not block.bn3.weight.any() for block in ImageNetResNet(50, zero_init_residual=True).layer1)


@pytest.mark.parametrize("depth,nearest", [(21, "20 or 26"), (18, "14 or 20"), (3, "8"), (0, "8")])
def test_bad_cifar_depth_names_nearest_valid(depth, nearest):
    with pytest.raises(ConfigError, match=f"got {depth}; nearest valid: {nearest}$"):
        CifarResNet(depth)


def test_bad_imagenet_depth_lists_valid_ones():
    with pytest.raises(ConfigError, match="18, 34, 50, 101, 152"):
        ImageNetResNet(48)


@pytest.mark.parametrize("build", [CifarResNet, ImageNetResNet])
def test_unknown_shortcut_option(build):
    with pytest.raises(ValueError, match="unknown shortcut option 'D'.*A, B, C"):
        build(shortcut="D")


def test_models_pickle_and_deepcopy():
    # No lambdas inside modules: DDP spawn and checkpoint tooling pickle them.
    for model in (CifarResNet(20, "A"), ImageNetResNet(18, "A")):
        clone = pickle.loads(pickle.dumps(model))
        x = torch.randn(1, 3, 32, 32)
        model.eval(), clone.eval()
        torch.testing.assert_close(clone(x), model(x))
        copy.deepcopy(model)


# The sequel (He et al. 2016): CIFAR bottleneck nets of depth 9n+2, original and pre-activation units.
PREACT_BLOCKS = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


def conv_and_fc_weights(model: nn.Module) -> int:
    """The count the sequel reports (its 10.2M for ResNet-1001): convolution and classifier weights, not BN's."""
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))  # fmt: skip


@pytest.mark.parametrize("block", [Bottleneck, PreActBottleneck])
def test_cifar_bottleneck_nets_match_the_sequels_parameter_counts(block):
    resnet164 = CifarResNet(164, shortcut="B", block=block)
    assert [len(s) for s in (resnet164.layer1, resnet164.layer2, resnet164.layer3)] == [18, 18, 18]
    assert round(n_params(resnet164) / 1e6, 1) == 1.7
    assert resnet164.fc.in_features == 256
    if block is PreActBottleneck:
        with torch.device("meta"):
            resnet1001 = CifarResNet(1001, shortcut="B", block=block)
        assert len(resnet1001.layer1) == 111
        assert round(conv_and_fc_weights(resnet1001) / 1e6, 1) == 10.2
        assert round(n_params(resnet1001) / 1e6, 2) == 10.33  # BN's scale and shift included


def relus_after(graph: fx.Graph, node: fx.Node, modules: dict) -> bool:
    """Whether `node` feeds a ReLU directly."""
    return any(
        (u.op == "call_module" and isinstance(modules[u.target], nn.ReLU)) or u.target in (torch.relu, F.relu)
        for u in node.users
    )


@pytest.mark.parametrize("kind", sorted(PREACT_BLOCKS))
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_a_preactivation_net_has_no_relu_after_an_addition_and_one_bn_relu_before_pooling(kind, shortcut):
    depth = 20 if kind == "basic" else 29
    model = CifarResNet(depth, shortcut=shortcut, block=PREACT_BLOCKS[kind])
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    additions = [n for n in traced.graph.nodes if n.target in (operator.add, operator.iadd, torch.add)]
    assert len(additions) == 9
    assert not any(relus_after(traced.graph, n, modules) for n in additions)
    [pool] = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == "avgpool"]
    relu = pool.args[0]
    assert isinstance(modules[relu.target], nn.ReLU)
    assert isinstance(modules[relu.args[0].target], nn.BatchNorm2d)
    assert relu.args[0].args[0] in additions  # the last unit's sum, normalised once
    # The stem is a bare conv: the first unit's own BN-ReLU normalises it.
    assert isinstance(model.bn1, nn.Identity)
    # The original unit, for contrast: a ReLU after every addition.
    original = fx.symbolic_trace(CifarResNet(20))
    original_modules = dict(original.named_modules())
    original_adds = [n for n in original.graph.nodes if n.target in (operator.add, operator.iadd, torch.add)]
    assert all(relus_after(original.graph, n, original_modules) for n in original_adds)


@pytest.mark.parametrize("block", [PreActBasicBlock, PreActBottleneck, Bottleneck])
@pytest.mark.parametrize("residual", [True, False])
def test_sequel_units_forward_backward_and_zero_init(block, residual):
    depth = 20 if block.weighted_layers == 2 else 29
    model = CifarResNet(depth, shortcut="B", residual=residual, block=block, zero_init_residual=True)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    last = model.layer2[1]
    last_weight = {PreActBasicBlock: "conv2", PreActBottleneck: "conv3", Bottleneck: "bn3"}[block]
    assert getattr(last, last_weight).weight.any() != residual  # zeroed only on residual branches


def test_a_preactivation_unit_starts_as_the_identity_when_zero_initialised():
    unit = PreActBottleneck(64, 16)  # 64 channels in and out, stride 1: the identity shortcut
    unit.zero_init_last()
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(unit(x), x)


def test_the_imagenet_trunk_takes_a_preactivation_unit_and_keeps_its_stem():
    model = ImageNetResNet(50, block=PreActBottleneck)
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.final_norm, nn.BatchNorm2d)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ConfigError, match="ResNet-50 is built of 3-layer units.*PreActBasicBlock has 2"):
        ImageNetResNet(50, block=PreActBasicBlock)


def test_bottleneck_cifar_depth_names_nearest_valid():
    with pytest.raises(ConfigError, match=r"with PreActBottleneck must be 9n\+2 .*164, 1001.*got 111; .*110 or 119"):
        CifarResNet(111, block=PreActBottleneck)
