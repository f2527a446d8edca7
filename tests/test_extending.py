"""docs/extending.md, run: its files written into a fresh folder, its commands run on a small CIFAR-10, and the
effect of each extension checked on what the run wrote."""

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import QUIET, REPO
from resnet_lab.cli import main

DOC = REPO / "docs" / "extending.md"
BLOCK = re.compile(r"```(\w+)(?: file=(\S+))?\n(.*?)```", re.S)
TINY = [
    "--data.batch_size", "16", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
    *QUIET,
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
    assert any(".gate." in key for key in checkpoint_of(run)["state_dict"])


def check_shortcut(run: Path) -> None:
    assert "backbone.layer2.0.downsample.project.1.weight" in checkpoint_of(run)["state_dict"]


def check_augmentation(run: Path) -> None:
    from myfork.augment import Cutout  # the file the doc wrote

    cutout = Cutout(8)
    images = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    out = cutout.apply(images, cutout.draw(4, torch.Generator().manual_seed(0)))
    zeros = (out == 0).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 3 * 9 * 9)).all()  # a square of at most 9 x 9 pixels in each image
    cutout_run, augmix_run = sorted(run.parent.glob("version_*"))  # the two commands, in order
    assert "myfork.augment.Cutout" in (cutout_run / "config.yaml").read_text()
    augmentations = yaml.safe_load((augmix_run / "config.yaml").read_text())["data"]["init_args"]["augmentations"]
    assert [a["class_path"] for a in augmentations] == ["resnet_lab.data.PadCropFlip", "resnet_lab.data.EachImage"]
    assert augmentations[1]["init_args"]["transform"]["class_path"] == "torchvision.transforms.v2.AugMix"


def check_schedule(run: Path) -> None:
    [schedule] = checkpoint_of(run)["lr_schedulers"]
    assert schedule["T_max"] == 64000 and schedule["last_epoch"] == 2


def check_dataset(run: Path) -> None:
    assert run.parent.name == "resnet20_cifar" and "myfork.data.NpzDataModule" in (run / "config.yaml").read_text()
    assert checkpoint_of(run)["state_dict"]["backbone.fc.weight"].shape == (10, 64)


def check_metric(run: Path) -> None:
    tags = set(EventAccumulator(str(run)).Reload().Tags()["scalars"])
    assert {"train/acc_top5", "train/err_top5", "train/confidence", "train/err_top1"} <= tags


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
    "A figure": check_figure,
}


def test_every_section_is_checked():
    assert list(SECTIONS) == list(CHECKS)


@pytest.fixture
def fork(tmp_path, cifar_root, monkeypatch):
    """A fresh folder holding every file the doc shows, importable, with the small CIFAR as the data."""
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
            cifar = "myfork.data.NpzDataModule" not in args
            main([*args, *TINY, *(["--data.val_size", "50"] if cifar else [])])
        else:
            monkeypatch.setattr(sys, "argv", args[1:])
            runpy.run_path(args[1], run_name="__main__")
    CHECKS[section](last_run())
