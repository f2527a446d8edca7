"""Moving weights in and out: the published option-A CIFAR checkpoints, torchvision and safetensors files."""

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from resnet_lab.checkpoints import check_state_dict_matches, read_checkpoint
from resnet_lab.errors import DataError, DatasetNotFoundError
from resnet_lab.models import CifarResNet


def akamaster_to_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Keys of the most widely used PyTorch CIFAR ResNets (`module.` prefix, `linear`) in our names (`fc`)."""
    state = checkpoint.get("state_dict", checkpoint)
    return {k.removeprefix("module.").replace("linear.", "fc.", 1): v for k, v in state.items()}


def import_cifar_checkpoint(source: Path, config: Path | None, out: Path) -> int:
    """Write a checkpoint of ours from a published option-A CIFAR checkpoint; returns the depth.

    The model is built as `main.py` builds it, from `config` (its training recipe) or, without one, from the
    option-A CIFAR ResNet of the checkpoint's depth with the module's defaults, so the result loads with
    `ImageClassifier.load_from_checkpoint(out)` and `python main.py test --config <config> --ckpt_path <out>`.
    """
    from resnet_lab.cli import ResNetLabCLI  # the CLI imports this package's data and models

    state = akamaster_to_state_dict(read_checkpoint(source))
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
    if not blocks or "fc.weight" not in state:
        raise DataError(f"{source} holds no CIFAR ResNet (no layer1.* or linear/fc weights): is it the right file?")
    depth = 6 * len(blocks) + 2
    num_classes = state["fc.weight"].shape[0]
    check_state_dict_matches(
        CifarResNet(depth, num_classes=num_classes), state, f"{source} (read as an option-A CIFAR ResNet-{depth})"
    )
    if config is not None and not config.is_file():
        raise DatasetNotFoundError(f"no config {config}: pass --config with the experiment the weights belong to")
    data = "resnet_lab.data.CIFAR100DataModule" if num_classes == 100 else "resnet_lab.data.CIFAR10DataModule"
    args = [*(["--config", str(config)] if config else ["--data", data]),
            "--model.backbone", "resnet_lab.models.CifarResNet",
            "--model.backbone.init_args.depth", str(depth), "--model.backbone.init_args.shortcut", "A",
            "--model.backbone.init_args.residual", "true",
            "--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]  # fmt: skip
    cli = ResNetLabCLI(args=args, run=False)
    if cli.model.backbone.num_classes != num_classes:
        raise DataError(
            f"{source} has {num_classes} classes but the config's data module has {cli.model.backbone.num_classes}"
        )
    cli.model.backbone.load_state_dict(state, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.save_checkpoint(out, weights_only=True)  # imported weights: no optimizer or loop state
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
