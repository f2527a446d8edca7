"""docs/extending.md, run: its files written into a fresh folder, its commands run on a small CIFAR-10, and the
effect of each extension checked on what the run wrote."""

import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import QUIET, REPO
from resnet_lab.cli import main
from resnet_lab.errors import ConfigError
from resnet_lab.models import CifarResNet
from resnet_lab.module import ImageClassifier

DOC = REPO / "docs" / "extending.md"
BLOCK = re.compile(r"```(\w+)(?: file=(\S+))?\n(.*?)```", re.S)
TINY = [
    "--data.batch_size", "16", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
    *QUIET,
]  # fmt: skip
IMAGENET_SMALL = [
    "--data.crop_size", "32", "--data.val_resize", "36", "--data.test_scales", "[32, 36]",
    "--data.train_augmentation.init_args.scale_range", "[36, 48]", "--data.num_workers", "0",
]  # fmt: skip


def sections() -> dict[str, tuple[dict[str, str], list[str]]]:
    """Each `## ` section's files (path -> text) and shell commands."""
    found = {}
    for part in DOC.read_text().split("\n## ")[1:]:
        title, body = part.split("\n", 1)
        files = {path: text for kind, path, text in BLOCK.findall(body) if path}
        commands = [line for kind, _, text in BLOCK.findall(body) if kind == "shell" for line in text.splitlines()]
        found[title.strip()] = (files, commands)
    return found


SECTIONS = sections()


def last_run() -> Path:
    [run] = sorted(Path("logs").glob("*/version_*"), key=lambda p: p.stat().st_mtime)[-1:]
    return run


def checkpoint_of(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def check_block(run: Path) -> None:
    from myfork.blocks import DropoutBasicBlock  # the file the doc wrote

    se_run, dropout_run = sorted(run.parent.glob("version_*"))  # the two commands, in order
    state = checkpoint_of(se_run)["state_dict"]
    # An SE in every unit, reduction 8 as the config says: 16 channels to 2 in the first stage.
    assert state["backbone.layer1.0.attn.gate.1.weight"].shape == (2, 16, 1, 1)
    assert sum(key.endswith(".attn.gate.1.weight") for key in state) == 9
    saved = yaml.safe_load((dropout_run / "config.yaml").read_text())["model"]
    backbone = saved.get("init_args", saved)["backbone"]["init_args"]
    assert backbone["block"] == "myfork.blocks.DropoutBasicBlock" and backbone["block_kwargs"] == {"drop": 0.2}
    # What the run built, from its own config.yaml: a dropout of 0.2 in every unit, active in training only.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ImageClassifier, "model")
    net = parser.instantiate(parser.parse_object({"model": saved})).model.backbone
    units = [m for m in net.modules() if isinstance(m, DropoutBasicBlock)]
    assert len(units) == 9 and {m.dropout.p for m in units} == {0.2}
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(net.train()(x), net(x))
    assert torch.equal(net.eval()(x), net(x))
    # The refusal the doc quotes is the one a misspelt option gets.
    quoted = re.search(r"`error: (block_kwargs key 'dorp'.*?)`", DOC.read_text()).group(1)
    with pytest.raises(ConfigError) as refusal:
        CifarResNet(20, block=DropoutBasicBlock, block_kwargs={"dorp": 0.2})
    assert str(refusal.value) == quoted


def check_shortcut(run: Path) -> None:
    assert "backbone.layer2.0.downsample.project.1.weight" in checkpoint_of(run)["state_dict"]


def check_augmentation(run: Path) -> None:
    from myfork.augment import Cutout  # the file the doc wrote

    from resnet_lab.data import BatchTransforms, ImageNetDataModule, PaperAugmentation

    cutout = Cutout(8)
    images = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    out = cutout.apply(images, cutout.draw(4, torch.Generator().manual_seed(0)))
    zeros = (out == 0).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 3 * 8 * 8)).all()  # a square of at most 8 x 8 pixels in each image
    cutout_run, augmix_run = sorted(run.parent.glob("version_*"))  # the CIFAR commands, in order
    augmentations = yaml.safe_load((cutout_run / "config.yaml").read_text())["data"]["init_args"]["augmentations"]
    assert [a["class_path"] for a in augmentations] == ["resnet_lab.data.PadCropFlip", "myfork.augment.Cutout"]
    augmentations = yaml.safe_load((augmix_run / "config.yaml").read_text())["data"]["init_args"]["augmentations"]
    assert [a["class_path"] for a in augmentations] == ["resnet_lab.data.PadCropFlip", "resnet_lab.data.EachImage"]
    assert augmentations[1]["init_args"]["transform"]["class_path"] == "torchvision.transforms.v2.AugMix"
    # The same class on the ImageNet experiment, after the recipe's colour noise: a square of each image at 0 (the
    # normalised black), the rest as the recipe alone makes it.
    [imagenet_run] = Path("logs/resnet18_imagenette").glob("version_*")
    assert checkpoint_of(imagenet_run)["global_step"] == 2
    saved = yaml.safe_load((imagenet_run / "config.yaml").read_text())["data"]["init_args"]
    assert [a["class_path"] for a in saved["augmentations"]] == ["myfork.augment.Cutout"]
    built = {"augmentations": [Cutout(16)], "train_augmentation": PaperAugmentation((36, 48))}  # as the run built them
    data = ImageNetDataModule(**{**saved, **built})
    assert [type(a).__name__ for a in data.batch_transforms.augmentations] == ["PCALighting", "Cutout"]
    data.setup("fit")
    images, labels, _ = next(iter(data.train_dataloader()))
    cut, _ = data.batch_transforms(images, labels, 3)
    recipe, _ = BatchTransforms(data.data_augmentations(), data.normalize, data.num_classes)(images, labels, 3)
    black = (0 - data.normalize.mean) / data.normalize.std
    changed = (cut != recipe).any(dim=1)
    assert changed.flatten(1).any(1).all() and torch.allclose(cut.permute(0, 2, 3, 1)[changed], black.flatten())
    assert changed.flatten(1).sum(1).max() <= 16 * 16


def check_schedule(run: Path) -> None:
    [schedule] = checkpoint_of(run)["lr_schedulers"]
    assert schedule["T_max"] == 64000 and schedule["last_epoch"] == 2


def check_dataset(run: Path) -> None:
    assert run.parent.name == "resnet20_cifar" and "myfork.data.NpzDataModule" in (run / "config.yaml").read_text()
    assert checkpoint_of(run)["state_dict"]["backbone.fc.weight"].shape == (10, 64)


def check_metric(run: Path) -> None:
    tags = set(EventAccumulator(str(run)).Reload().Tags()["scalars"])
    assert {"train/acc_top5", "train/err_top5", "train/confidence", "train/err_top1"} <= tags


def check_evaluation_metric(run: Path) -> None:
    ece = EventAccumulator(str(run)).Reload().Scalars("val/ece")
    assert ece and 0 <= ece[-1].value <= 1


def check_loss(run: Path) -> None:
    loss = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["loss"]
    assert loss == {"class_path": "myfork.losses.FocalLoss", "init_args": {"gamma": 1.0}}
    from myfork.losses import FocalLoss

    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    focal, plain = FocalLoss(0.0)(logits, labels), torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(focal, plain)  # gamma 0 is cross-entropy
    assert FocalLoss(1.0)(logits, labels) < plain


def check_module(run: Path) -> None:
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert model["class_path"] == "myfork.module.LogitPenalty" and model["init_args"]["penalty"] == 0.1
    tests = json.loads((run / "run.json").read_text())["tests"]
    assert [t["weights"] for t in tests] == ["last.ckpt"]  # the stock test command, logged into the fork's run


def check_figure(run: Path) -> None:
    assert Path("logs/figures/lr.png").is_file()
    assert len(EventAccumulator(str(run)).Reload().Scalars("lr-SGD")) == 2  # what the figure drew


CHECKS = {
    "A residual unit": check_block,
    "A shortcut": check_shortcut,
    "An augmentation": check_augmentation,
    "A schedule": check_schedule,
    "A dataset": check_dataset,
    "A training metric": check_metric,
    "An evaluation metric": check_evaluation_metric,
    "A loss": check_loss,
    "A module": check_module,
    "A figure": check_figure,
}


def test_every_section_is_checked():
    assert list(SECTIONS) == list(CHECKS)


@pytest.fixture
def fork(tmp_path, cifar_root, imagenet_root, monkeypatch):
    """A fresh folder holding every file the doc shows, importable, with the small CIFAR (and beside it the small
    ImageFolder tree, `$RESNET_LAB_DATA/imagenet`) as the data."""
    work = tmp_path / "fork"
    for files, _ in SECTIONS.values():
        for path, text in files.items():
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            (work / path).write_text(text)
    (work / "myfork" / "__init__.py").write_text("")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.setenv("RESNET_LAB_DATA", str(cifar_root))
    for name in [m for m in sys.modules if m == "myfork" or m.startswith("myfork.")]:
        monkeypatch.delitem(sys.modules, name)
    return work


@pytest.mark.parametrize("size", [1, 8, 9, 16, 17])
def test_cutout_zeroes_exactly_a_size_by_size_square(fork, size):
    from myfork.augment import Cutout  # the file the doc wrote

    cutout = Cutout(size)
    images = torch.randint(1, 256, (3, 3, 32, 32), dtype=torch.uint8)
    # Centres in the middle, and at the top-left and bottom-right corners, where the square is clipped.
    draws = torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.999, 0.999]])
    out = cutout.apply(images, draws)
    zeroed = out == 0
    assert torch.equal(zeroed, zeroed[:, :1].expand_as(zeroed))  # the same square in every channel
    rows, cols = zeroed[:, 0].any(2), zeroed[:, 0].any(1)
    half = size // 2
    assert rows.sum(1).tolist() == cols.sum(1).tolist() == [size, size - half, min(size, half + 1)]
    assert zeroed[:, 0].flatten(1).sum(1).tolist() == [size * size, (size - half) ** 2, min(size, half + 1) ** 2]
    assert rows[0].nonzero().flatten().tolist() == list(range(16 - half, 16 - half + size))
    assert torch.equal(out[~zeroed], images[~zeroed])  # every other pixel as it was


@pytest.mark.slow
@pytest.mark.parametrize("section", list(CHECKS))
def test_the_worked_example_runs_and_takes_effect(section, fork, monkeypatch):
    commands = SECTIONS[section][1]
    if section == "A figure":  # a run to draw first
        commands = ["python main.py fit --config configs/resnet20_cifar.yaml --trainer.log_every_n_steps 1", *commands]
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "python"
        if args[1] == "main.py":
            args = [a.replace("configs/", f"{REPO}/configs/", 1) if a.startswith("configs/") else a for a in args[2:]]
            if any(a.endswith("imagenette.yaml") for a in args):
                family = IMAGENET_SMALL
            else:
                family = ["--data.val_size", "50"] if "myfork.data.NpzDataModule" not in args else []
            main([*args, *TINY, *family])
        else:
            monkeypatch.setattr(sys, "argv", args[1:])
            runpy.run_path(args[1], run_name="__main__")
    CHECKS[section](last_run())
