"""Moving weights in and out: the published option-A CIFAR checkpoints, torchvision and safetensors files."""

from pathlib import Path

import lightning
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from resnet_lab.checkpoints import check_state_dict_matches, read_checkpoint
from resnet_lab.errors import DataError
from resnet_lab.models import CifarResNet

INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def akamaster_to_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Keys of the most widely used PyTorch CIFAR ResNets (`module.` prefix, `linear`) in our names (`fc`)."""
    state = checkpoint.get("state_dict", checkpoint)
    return {k.removeprefix("module.").replace("linear.", "fc.", 1): v for k, v in state.items()}


def import_cifar_checkpoint(source: Path, config: Path | None, out: Path) -> int:
    """Write a checkpoint of ours from a published option-A CIFAR checkpoint; returns the depth.

    The result loads with `ImageClassifier.load_from_checkpoint` and with
    `python main.py test --config <config> --ckpt_path <out>`; `config` supplies the training recipe.
    """
    state = akamaster_to_state_dict(read_checkpoint(source))
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
    if not blocks or "fc.weight" not in state:
        raise DataError(f"{source} holds no CIFAR ResNet (no layer1.* or linear/fc weights): is it the right file?")
    depth = 6 * len(blocks) + 2
    num_classes = state["fc.weight"].shape[0]
    net = CifarResNet(depth, shortcut="A", num_classes=num_classes)
    check_state_dict_matches(net, state, f"{source} (read as an option-A CIFAR ResNet-{depth})")
    net.load_state_dict(state, strict=True)
    config = config or Path(__file__).parents[3] / "configs" / f"resnet{depth}_cifar.yaml"
    if not config.is_file():
        raise DataError(f"no config {config} for a ResNet-{depth}: pass --config with the experiment it belongs to")
    model = yaml.safe_load(config.read_text())["model"]
    model["backbone"] = {
        "class_path": "resnet_lab.models.CifarResNet",
        "init_args": {"depth": depth, "shortcut": "A", "num_classes": num_classes},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "state_dict": {f"backbone.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {**model, "_instantiator": INSTANTIATOR},
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0, "global_step": 0,
    }, out)  # fmt: skip
    return depth


def backbone_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The network's weights from one of our checkpoints, without the `backbone.` prefix: torchvision's keys for
    the ImageNet nets with option B."""
    state = read_checkpoint(checkpoint).get("state_dict")
    if not state or not any(k.startswith("backbone.") for k in state):
        raise DataError(f"{checkpoint} holds no `backbone.*` weights: is it a checkpoint of this project?")
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def export_weights(checkpoint: Path, torchvision_out: Path | None = None, safetensors_out: Path | None = None) -> None:
    """Export the network of a checkpoint as a torchvision-style state dict (.pth) and/or safetensors."""
    state = {k: v.contiguous() for k, v in backbone_state_dict(checkpoint).items()}
    if torchvision_out:
        torch.save(state, torchvision_out)
    if safetensors_out:
        save_file(state, str(safetensors_out))


def load_torchvision_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a torchvision ResNet state dict (e.g. `resnet50-*.pth`) into our ImageNetResNet, strictly."""
    state = read_checkpoint(path)
    check_state_dict_matches(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model
