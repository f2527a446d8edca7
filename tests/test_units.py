"""The residual-unit contract (`resnet_lab.models.ResidualUnit`): the stock networks unchanged by it (their published
weights load strictly, and a seed gives the weights and outputs it gave before the base class), the one-line
refusals of a unit that lacks a declaration or of a misspelt `block_kwargs` key, the `attn_layer` and `norm_layer`
slots from a YAML config, and an initialisation that leaves the modules a fork brings alone."""

import hashlib
import pickle

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from torch import Tensor, nn

from conftest import CONFIGS, QUIET
from resnet_lab.errors import ConfigError
from resnet_lab.models import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    GroupNorm,
    ImageNetResNet,
    PreActBasicBlock,
    PreActBottleneck,
    ResidualUnit,
)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation, as a fork would write it for the `attn_layer` slot (its own init: a marked bias)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)
        nn.init.constant_(self.expand.bias, 3.0)  # the gate starts open: what the network's init must not undo

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


# A seed's network as the units before the base class built it (computed with them): the number of state-dict
# entries, a hash of their keys and shapes, a position-weighted sum of every tensor, the next random number drawn
# after building (all the draws the build made), and the sum and absolute sum of its training-mode logits for a
# fixed input (32x32 for CIFAR, 64x64 for ImageNet, batch 4).
STOCK = {
    "resnet20-A": ("CifarResNet", {"depth": 20, "shortcut": "A"}),
    "resnet20-B-zero-init": ("CifarResNet", {"depth": 20, "shortcut": "B", "zero_init_residual": True}),
    "resnet20-C": ("CifarResNet", {"depth": 20, "shortcut": "C"}),
    "plain20": ("CifarResNet", {"depth": 20, "residual": False}),
    "resnet29-B-v1.5": (
        "CifarResNet", {"depth": 29, "shortcut": "B", "block": Bottleneck, "block_kwargs": {"stride_in_1x1": False}},
    ),
    "preact20-A": ("CifarResNet", {"depth": 20, "shortcut": "A", "block": PreActBasicBlock}),
    "preact29-B": ("CifarResNet", {"depth": 29, "shortcut": "B", "block": PreActBottleneck}),
    "resnet18-A": ("ImageNetResNet", {"depth": 18, "shortcut": "A"}),
    "plain18": ("ImageNetResNet", {"depth": 18, "residual": False}),
    "resnet50-B": ("ImageNetResNet", {"depth": 50, "shortcut": "B"}),
    "resnet50-C-v1.5": ("ImageNetResNet", {"depth": 50, "shortcut": "C", "stride_in_1x1": False}),
    "preact50-B": ("ImageNetResNet", {"depth": 50, "shortcut": "B", "block": PreActBottleneck}),
}  # fmt: skip
BEFORE = {
    "resnet20-A": (116, "2d1ebde4d7a547fe", 97840.55082800912, 0.7549993991851807, 2.0453474, 31.374101),
    "resnet20-B-zero-init": (128, "301aa5a51c650404", 95053.12829131668, 0.9832592010498047, 0.76109958, 7.5614395),
    "resnet20-C": (170, "bc34969878687321", 216823.78726987197, 0.944915235042572, 6.186618, 17.982152),
    "plain20": (116, "2d1ebde4d7a547fe", 97840.55082800912, 0.7549993991851807, -1.74316, 7.8359646),
    "resnet29-B-v1.5": (188, "f1da4d9ab740208a", 607863.4989141122, 0.8263915181159973, 3.5152252, 23.233932),
    "preact20-A": (116, "f63abec60d61efab", 97840.55082800912, 0.7549993991851807, -1.5600476, 7.902822),
    "preact29-B": (173, "7d4e824f5cc83b7c", 465180.25870553835, 0.8263915181159973, 1.3499259, 9.0212403),
    "resnet18-A": (104, "09aae227314acfcd", 555105.3057392186, 0.8050037622451782, 5.132997, 2229.1418),
    "plain18": (104, "09aae227314acfcd", 555105.3057392186, 0.8050037622451782, 3.4248781, 861.78093),
    "resnet50-B": (320, "781bb16f43b8f96f", 11527550.148905918, 0.6515359282493591, 150.28861, 2089.2688),
    "resnet50-C-v1.5": (392, "fb60c00b89046b92", 20275264.5235652, 0.09076333045959473, 16.482826, 1257.0945),
    "preact50-B": (305, "97fac91836d0acec", 9516297.58339472, 0.6515359282493591, 53.322289, 858.35448),
}


@pytest.mark.parametrize("name", STOCK)
def test_a_seeded_stock_network_has_the_keys_weights_and_outputs_it_had_before_the_base_class(name):
    family, kwargs = STOCK[name]
    torch.manual_seed(0)
    net = (CifarResNet if family == "CifarResNet" else ImageNetResNet)(**kwargs)
    after = torch.rand(()).item()
    state = net.state_dict()
    keys = hashlib.sha256("\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items()).encode()).hexdigest()[:16]
    weights = sum((i + 1) * v.double().sum().item() for i, v in enumerate(state.values()))
    size = 32 if family == "CifarResNet" else 64
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net.train()(x).double()
    count, keys_before, weights_before, after_before, total, magnitude = BEFORE[name]
    assert (len(state), keys) == (count, keys_before)
    assert weights == pytest.approx(weights_before, rel=1e-9) and after == after_before
    assert out.sum().item() == pytest.approx(total, rel=1e-4, abs=1e-4)
    assert out.abs().sum().item() == pytest.approx(magnitude, rel=1e-4)


def test_the_published_cifar_weights_load_strictly_and_classify_real_images(shared_data):
    from resnet_lab.paper.weights import akamaster_to_state_dict

    weights = sorted((shared_data / "pretrained" / "cifar10-akamaster").glob("resnet*.th"))
    if not weights:
        pytest.skip("the published CIFAR checkpoints are not in the shared data")
    with (shared_data / "cifar-10-batches-py" / "test_batch").open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    # Test images 0..1016 carry the official pixels; the weights expect ImageNet statistics.
    images = torch.from_numpy(batch[b"data"][:256]).reshape(-1, 3, 32, 32).float() / 255
    images = (images - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[
        :, None, None
    ]
    labels = torch.tensor(batch[b"labels"][:256])
    assert [int(p.name[6:8]) for p in weights] == [20, 32, 44, 56]
    for path in weights:
        net = CifarResNet(int(path.name[6:8])).eval()
        net.load_state_dict(akamaster_to_state_dict(torch.load(path, weights_only=True, map_location="cpu")))
        with torch.no_grad():
            accuracy = (net(images).argmax(1) == labels).float().mean().item()
        assert accuracy >= 0.88, (path.name, accuracy)  # published: 91.7-93.4% on the whole test set


# --- The contract: what a unit declares, refused in one line when it does not --------------------------------


class Unit(ResidualUnit):
    """A minimal basic unit written from the base class, as a fork would."""

    expansion = 1
    weighted_layers = 2

    def __init__(self, in_planes, planes, stride=1, downsample=None, *, residual=True, norm_layer=nn.BatchNorm2d,
                 attn_layer=None, width_factor: int = 1) -> None:  # fmt: skip
        super().__init__(residual=residual)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.attn = attn_layer(planes) if attn_layer is not None else None
        self.downsample = downsample

    def residual_branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def refusal(build) -> str:  # noqa: ANN001 - a callable that builds a network
    with pytest.raises(ConfigError) as error:
        build()
    message = str(error.value)
    assert "\n" not in message
    return message


def without(attribute: str) -> type:
    return type(f"No{attribute.title().replace('_', '')}", (Unit,), {attribute: None})


def test_a_unit_written_from_the_base_class_trains():
    model = CifarResNet(14, shortcut="B", block=Unit, block_kwargs={"width_factor": 2})
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.layer2[0].downsample is not None  # the trunk's projection, handed in and added by the base class


@pytest.mark.parametrize("attribute", ["expansion", "weighted_layers"])
@pytest.mark.parametrize("family", [CifarResNet, ImageNetResNet])
def test_a_unit_without_a_declaration_is_refused_in_one_line(attribute, family):
    message = refusal(lambda: family(18 if family is ImageNetResNet else 20, block=without(attribute)))
    assert message.startswith(f"No{attribute.title().replace('_', '')} declares no `{attribute}`: give the class")
    assert f"`{attribute} = " in message  # how to declare it


def test_a_unit_without_its_branch_or_of_the_old_kind_is_refused_in_one_line():
    assert "defines no residual_branch(x)" in refusal(
        lambda: CifarResNet(20, block=type("NoBranch", (ResidualUnit,), {"expansion": 1, "weighted_layers": 2}))
    )

    class OldUnit(nn.Module):  # a unit of the old contract: its own shortcut, its own addition
        expansion, weighted_layers = 1, 2

    assert refusal(lambda: CifarResNet(20, block=OldUnit)).startswith(
        "OldUnit is not a residual unit: derive it from resnet_lab.models.ResidualUnit"
    )

    class TakesShortcut(Unit):
        def __init__(self, in_planes, planes, stride=1, *, shortcut="B", residual=True, norm_layer=nn.BatchNorm2d):  # noqa: ANN001
            super().__init__(in_planes, planes, stride, residual=residual, norm_layer=norm_layer)

    assert "TakesShortcut.__init__ does not take downsample, attn_layer: a unit is built as block(" in refusal(
        lambda: CifarResNet(20, block=TakesShortcut)
    )


def test_a_unit_that_drops_its_shortcut_or_its_attn_layer_is_refused():
    class DropsShortcut(Unit):
        def __init__(self, *args, downsample=None, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)

    class IgnoresAttn(Unit):
        def __init__(self, *args, attn_layer=None, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)

    CifarResNet(20, shortcut="A", block=DropsShortcut, residual=False)  # a plain net hands it none
    assert "DropsShortcut does not keep the shortcut it is handed" in refusal(
        lambda: CifarResNet(20, shortcut="B", block=DropsShortcut)
    )
    assert "IgnoresAttn ignores attn_layer" in refusal(
        lambda: CifarResNet(20, block=IgnoresAttn, attn_layer=SqueezeExcite)
    )


def test_zero_init_and_fig7_layers_are_asked_of_a_unit_only_where_used():
    CifarResNet(8, block=Unit)  # neither declared, neither needed
    assert "Unit does not say how its residual branch starts at zero: define zero_init_last()" in refusal(
        lambda: CifarResNet(8, block=Unit, zero_init_residual=True)
    )
    assert "Unit does not declare which layers Fig. 7 measures" in refusal(
        lambda: CifarResNet(8, block=Unit).response_layers()
    )


def test_the_depth_rule_is_the_units():
    assert [len(CifarResNet(d, block=Unit).layer1) for d in (8, 20)] == [1, 3]  # 6n+2
    three = type("ThreeLayers", (Unit,), {"weighted_layers": 3})
    assert len(CifarResNet(20, block=three).layer1) == 2  # 9n+2
    assert refusal(lambda: CifarResNet(32, block=three)) == (
        "CIFAR ResNet depth with ThreeLayers must be 9n+2 with n >= 1 (164, 1001...), got 32; nearest valid: 29 or 38"
    )
    assert refusal(lambda: ImageNetResNet(50, block=Unit)) == (
        "ImageNet ResNet-50 is built of 3-layer units (Table 1); Unit has 2"
    )
    layouts = ((2, 2, 2, 2), (3, 4, 6, 3), (3, 4, 23, 3))
    assert [u.depth_of(layers) for u in (BasicBlock, Bottleneck) for layers in layouts] == [18, 34, 68, 26, 50, 101]


@pytest.mark.parametrize(
    "family,block,kwargs,says",
    [
        (CifarResNet, Unit, {"width_factr": 2},
         "block_kwargs key 'width_factr' is not an argument of Unit (did you mean 'width_factor'?); it takes: "
         "width_factor"),
        (CifarResNet, BasicBlock, {"reduction_ratoi": 4},
         "block_kwargs key 'reduction_ratoi' is not an argument of BasicBlock; it takes: no options of its own"),
        (CifarResNet, Bottleneck, {"stride_in_1x": False},
         "block_kwargs key 'stride_in_1x' is not an argument of Bottleneck (did you mean 'stride_in_1x1'?); it "
         "takes: stride_in_1x1"),
        (CifarResNet, BasicBlock, {"norm_layer": nn.BatchNorm2d},
         "block_kwargs key 'norm_layer' is given to every unit by the network itself: set the network's own "
         "norm_layer"),
        (ImageNetResNet, Bottleneck, {"stride_in_1x1": False},
         "block_kwargs key 'stride_in_1x1' is ImageNetResNet's own argument: set stride_in_1x1"),
    ],
)  # fmt: skip
def test_a_misspelt_block_kwargs_key_is_refused_naming_the_unit_and_what_it_takes(family, block, kwargs, says):
    depth = {CifarResNet: 29 if block is Bottleneck else 20, ImageNetResNet: 50}[family]
    assert refusal(lambda: family(depth, block=block, block_kwargs=kwargs)) == says


def test_an_options_key_of_a_subclass_reaches_its_parents_through_kwargs():
    class Wider(Unit):
        def __init__(self, *args, extra: int = 0, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            self.extra = extra

    model = CifarResNet(8, block=Wider, block_kwargs={"extra": 3, "width_factor": 2})
    assert model.layer1[0].extra == 3
    assert refusal(lambda: CifarResNet(8, block=Wider, block_kwargs={"extr": 3})).endswith(
        "(did you mean 'extra'?); it takes: extra, width_factor"
    )


def test_a_misspelt_block_kwargs_key_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    from resnet_lab.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "resnet164_cifar.yaml"), "--data.root", str(tmp_path),
            "--model.backbone.init_args.block_kwargs", "{stride_in_1x: false}", *QUIET]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert str(exit_info.value) == (
        "error: block_kwargs key 'stride_in_1x' is not an argument of Bottleneck (did you mean 'stride_in_1x1'?); "
        "it takes: stride_in_1x1"
    )
    assert "Traceback" not in capsys.readouterr().err


# --- The trunk builds the shortcut; the base class adds it ------------------------------------------------------


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck])
@pytest.mark.parametrize("attn", [False, True])
def test_the_base_class_adds_the_branch_and_the_handed_shortcut(block, attn):
    torch.manual_seed(0)
    projection = nn.Sequential(nn.Conv2d(32, 16 * block.expansion, 1, stride=2, bias=False))
    unit = block(32, 16, 2, downsample=projection, attn_layer=SqueezeExcite if attn else None).train()
    x = torch.randn(2, 32, 8, 8)
    branch_input = unit.relu(unit.bn1(x)) if block.pre_activation else x
    branch = unit.residual_branch(branch_input)
    if attn:
        branch = unit.attn(branch)
    shortcut = projection(branch_input if block.pre_activation else x)  # a pre-activation projection: the BN-ReLU
    expected = branch + shortcut if block.pre_activation else torch.relu(branch + shortcut)
    torch.testing.assert_close(unit(x), expected, rtol=0, atol=0)
    plain = block(32, 16, 2, residual=False).train()
    assert unit.downsample is projection and plain.downsample is None
    out = plain.residual_branch(plain.relu(plain.bn1(x)) if block.pre_activation else x)
    torch.testing.assert_close(plain(x), out if block.pre_activation else torch.relu(out), rtol=0, atol=0)


# --- attn_layer and norm_layer from a config ----------------------------------------------------------------------


def network_from_yaml(tmp_path, text: str) -> nn.Module:
    """The network a config file describes, parsed and built by jsonargparse as LightningCLI builds the backbone."""
    path = tmp_path / "net.yaml"
    path.write_text(text)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_argument("--backbone", type=nn.Module)
    return parser.instantiate(parser.parse_args(["--config", str(path)])).backbone


@pytest.mark.parametrize("family,depth", [("CifarResNet", 20), ("ImageNetResNet", 18)])
def test_squeeze_excitation_and_group_norm_from_a_yaml_config(tmp_path, family, depth):
    net = network_from_yaml(
        tmp_path,
        f"""
backbone:
  class_path: resnet_lab.models.{family}
  init_args:
    depth: {depth}
    shortcut: B
    num_classes: 10
    norm_layer:
      class_path: resnet_lab.models.GroupNorm
      init_args:
        num_groups: 8
    attn_layer:
      class_path: test_units.SqueezeExcite
      init_args:
        reduction: 8
""",
    )
    units = [m for m in net.modules() if isinstance(m, ResidualUnit)]
    assert len(units) == (9 if family == "CifarResNet" else 8)
    assert all(type(u.attn).__name__ == "SqueezeExcite" for u in units)
    assert all(u.attn.reduce.out_channels == u.bn2.num_channels // 8 for u in units)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm | nn.BatchNorm2d)]
    assert norms and all(isinstance(m, GroupNorm) and m.num_groups == 8 for m in norms)  # the projections' too
    loss = nn.functional.cross_entropy(net(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
    loss.backward()
    assert all(u.attn.reduce.weight.grad.abs().sum() > 0 for u in units)
    pickle.loads(pickle.dumps(net))  # nothing unpicklable kept from the config's factories


def test_without_attn_layer_a_unit_has_nothing_more(tmp_path):
    plain = network_from_yaml(tmp_path, "backbone:\n  class_path: resnet_lab.models.CifarResNet\n")
    with_se = CifarResNet(20, attn_layer=SqueezeExcite)
    assert set(plain.state_dict()) == set(CifarResNet(20).state_dict())
    extra = set(with_se.state_dict()) - set(plain.state_dict())
    assert extra and all(".attn." in key for key in extra)


def test_a_group_norm_that_does_not_divide_a_width_is_refused():
    assert refusal(lambda: CifarResNet(20, norm_layer=GroupNorm)) == (
        "GroupNorm: 16 channels do not split into num_groups=32 groups"
    )


def test_norm_layer_on_the_command_line_trains_and_its_run_rebuilds(tmp_path, monkeypatch):
    from resnet_lab.cli import main

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "demo_synthetic.yaml"), "--data.train_size", "128",
          "--data.val_size", "64", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", *QUIET,
          "--model.backbone.init_args.norm_layer", "resnet_lab.models.GroupNorm",
          "--model.backbone.init_args.norm_layer.num_groups", "4"])  # fmt: skip
    [run] = (tmp_path / "logs" / "demo_synthetic").glob("version_*")
    config = yaml.safe_load((run / "config.yaml").read_text())["model"]
    backbone = config.get("init_args", config)["backbone"]
    assert backbone["init_args"]["norm_layer"] == {
        "class_path": "resnet_lab.models.GroupNorm",
        "init_args": {"num_groups": 4, "eps": 1e-5, "affine": True},
    }
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    assert not any("running_mean" in k for k in state)  # no BN left: group norms keep no statistics
    # The run's recorded backbone builds the same network: its trained weights load strictly.
    net = network_from_yaml(tmp_path, yaml.safe_dump({"backbone": backbone}))
    net.load_state_dict(state, strict=True)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm | nn.BatchNorm2d)]
    assert len(norms) == 19 and all(isinstance(m, GroupNorm) and m.num_groups == 4 for m in norms)


# --- Initialisation: the trunk's and the stock units' layers, not a fork's -------------------------------------


class Gated(BasicBlock):
    """A fork's unit that nests a module of its own in a stock unit (its init: a scale that starts at zero)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.gate = nn.Sequential(nn.Conv2d(self.conv2.out_channels, self.conv2.out_channels, 1))
        nn.init.zeros_(self.gate[0].weight)

    def residual_branch(self, x: Tensor) -> Tensor:
        out = super().residual_branch(x)
        return out + self.gate(out)


class ScaledShortcut(nn.Module):
    """A fork's shortcut class with an init of its own."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
        nn.init.constant_(self.project.weight, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(x)


def he_std(conv: nn.Conv2d) -> float:
    return (2 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1])) ** 0.5


def test_the_initialisation_leaves_a_forks_modules_to_their_own():
    net = CifarResNet(20, shortcut=ScaledShortcut, block=Gated, attn_layer=SqueezeExcite, zero_init_residual=True)
    units = [m for m in net.modules() if isinstance(m, ResidualUnit)]
    for unit in units:
        assert torch.equal(unit.attn.expand.bias, torch.full_like(unit.attn.expand.bias, 3.0))
        assert not unit.gate[0].weight.any()
        assert torch.equal(unit.downsample.project.weight, torch.full_like(unit.downsample.project.weight, 0.5))
        assert not unit.bn2.weight.any()  # zero_init_residual still zeroes the stock unit's last BN
    # The stock unit's and the trunk's own layers still get He's init.
    for conv in [net.conv1, *(u.conv1 for u in units), *(u.conv2 for u in units)]:
        assert conv.weight.std().item() == pytest.approx(he_std(conv), rel=0.25)
    # Under the network's init the SE's 1x1 convs would have He's fan-out std, far from PyTorch's default.
    reduce = units[-1].attn.reduce
    assert reduce.weight.std().item() < 0.6 * he_std(reduce)


def test_a_unit_may_initialise_itself():
    class Own(Unit):
        def init_weights(self) -> None:
            nn.init.constant_(self.conv1.weight, 0.01)
            nn.init.constant_(self.conv2.weight, 0.02)

    net = CifarResNet(8, shortcut="B", block=Own)
    unit = net.layer2[0]
    assert torch.equal(unit.conv1.weight, torch.full_like(unit.conv1.weight, 0.01))
    # The projection the trunk built keeps the trunk's He init.
    assert unit.downsample[0].weight.std().item() == pytest.approx(he_std(unit.downsample[0]), rel=0.25)
