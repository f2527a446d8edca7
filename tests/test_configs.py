"""Every config file fits: each experiment for an iteration on tiny real-format data, each preset stacked on a small
experiment (torchgeo runs every one of its configs the same way)."""

import os
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, QUIET, data_class
from resnet_lab.cli import main
from resnet_lab.paper.__main__ import main as paper

EXPERIMENTS = sorted(CONFIGS.glob("*.yaml"))
PRESETS = sorted((CONFIGS / "presets").glob("*.yaml"))
# An iteration and one validation batch, without the progress bar, model summary and TensorBoard graph (tracing a
# 1202-layer net outlasts its iteration).
TINY = [
    "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
    *QUIET,
]  # fmt: skip
# What a preset needs on a machine with no GPU: the rest of it runs as written.
ON_THIS_CPU = {
    "ddp": ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.sync_batchnorm", "false"],
    "multinode": [
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.sync_batchnorm", "false",
    ],
    "fp16": ["--trainer.precision", "bf16-mixed"],  # float16 autocast is GPU-only in Lightning
    # Inductor would compile for a minute; aot_eager captures the same graph without generating kernels.
    "gpu_fast": ["--model.compile_backend", "aot_eager"],
    "cosine": ["--model.lr_scheduler.init_args.warmup_steps", "0"],  # one iteration is shorter than its warm-up
}  # fmt: skip


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield
    # A one-process DDP run leaves its process group behind; later tests in this process must not see it.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def data_for(config: Path, cifar_root: Path, imagenet_root: Path) -> list[str]:
    data = data_class(config)
    if data.endswith("CIFAR10DataModule"):
        return ["--data.root", str(cifar_root), "--data.val_size", "50", "--data.batch_size", "8"]
    if data.endswith("ImageNetDataModule"):
        # 64-pixel crops (the paper's scale range scaled with them): the network and recipe as configured, on a
        # thirteenth of the pixels.
        small = [
            "--data.crop_size", "64", "--data.eval_crop_size", "64", "--data.val_resize", "72",
            "--data.test_scales", "[64, 72]",
        ]  # fmt: skip
        if not config.stem.endswith("_tv2"):  # the paper's scale augmentation, scaled with the crops
            small += ["--data.train_augmentation.init_args.scale_range", "[73, 137]"]
        return ["--data.root", str(imagenet_root), "--data.batch_size", "2", "--data.num_workers", "0", *small]
    return ["--data.train_size", "64", "--data.val_size", "16"]


def fit(config_args: list[str], tmp_path: Path) -> Path:
    main(["fit", *config_args, *TINY])
    [last] = Path("logs").glob("*/version_0/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 1
    return last


@pytest.mark.slow
@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_fits(config, cifar_root, imagenet_root, tmp_path):
    # One iteration is shorter than the modern recipes' warm-ups.
    extra = ON_THIS_CPU["cosine"] if config.stem.endswith(("_modern", "_tv2")) else []
    last = fit(["--config", str(config), *data_for(config, cifar_root, imagenet_root), *extra], tmp_path)
    if config.stem.startswith("preact_resnet1") and config.stem != "preact_resnet1001_cifar":
        # Fig. 7 on a pre-activation net: the stem conv and every unit's 3x3 convs, as the units declare them.
        paper(["responses", str(last), "--limit-batches", "1", "--out", str(tmp_path / "fig7"), "--data-root",
               str(cifar_root)])  # fmt: skip
        rows = (tmp_path / "fig7.csv").read_text().splitlines()[1:]
        assert len(rows) == {"preact_resnet110_cifar": 1 + 2 * 54, "preact_resnet164_cifar": 1 + 54}[config.stem]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_fits_stacked_on_an_experiment(preset, cifar_root, imagenet_root, tmp_path):
    family = "resnet18_imagenette" if "imagenet" in preset.stem else "resnet20_cifar"
    experiment = CONFIGS / f"{family}.yaml"
    args = ["--config", str(experiment), "--config", str(preset), *data_for(experiment, cifar_root, imagenet_root)]
    if family == "resnet20_cifar":
        args += ["--model.backbone.init_args.depth", "8"]
    fit([*args, *ON_THIS_CPU.get(preset.stem, [])], tmp_path)


AUGMENTATION_PRESETS = ["trivialaugment", "randaugment", "autoaugment", "random_erasing", "mixup", "cutmix"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", AUGMENTATION_PRESETS)
def test_every_augmentation_preset_stacks_on_an_imagenet_experiment(preset, cifar_root, imagenet_root, tmp_path):
    from torchvision.transforms import v2

    from resnet_lab.cli import ResNetLabCLI
    from resnet_lab.data import BatchTransforms, EachImage, MixBatch

    real = Path(os.environ.get("RESNET_LAB_DATA", "")) / "imagenette-mini"  # the real subset where there is one
    experiment = CONFIGS / "resnet18_imagenette.yaml"
    data = data_for(experiment, cifar_root, real if real.is_dir() else imagenet_root)
    stacked = ["--config", str(experiment), "--config", str(CONFIGS / "presets" / f"{preset}.yaml")]
    cli = ResNetLabCLI(args=["fit", *stacked, *data, *TINY])
    [last] = Path("logs").glob("*/version_0/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 1
    # It took effect, where a CIFAR experiment has it: after the recipe's colour noise, or as the mixing.
    dm = cli.datamodule
    mixing = preset in ("mixup", "cutmix")
    applied = [type(a).__name__ for a in dm.batch_transforms.augmentations]
    assert applied == ["PCALighting"] + ["EachImage"] * (not mixing)
    assert isinstance(dm.mixing, MixBatch) == mixing
    images, labels, _ = next(iter(dm.train_dataloader()))
    images, labels = images.repeat(8, 1, 1, 1), labels.repeat(8)  # 16 images, so that p 0.5 erases several
    stacked, targets = dm.batch_transforms(images, labels, 5)
    # The recipe alone, with the rounding to uint8 levels that an EachImage after the colour noise does itself.
    alone = [*dm.data_augmentations(), *([] if mixing else [EachImage(v2.Identity())])]
    recipe_alone, _ = BatchTransforms(alone, dm.normalize, dm.num_classes)(images, labels, 5)
    assert stacked.shape == recipe_alone.shape == (16, 3, 64, 64)
    changed = (stacked != recipe_alone).flatten(1).any(1)
    assert changed.sum() >= 4, changed  # a few images at least, not the rounding of all
    assert targets.shape == ((16, dm.num_classes) if mixing else (16,))


@pytest.mark.parametrize("experiment", ["resnet20_cifar", "resnet18_imagenette"])
def test_mixing_listed_among_the_augmentations_is_refused_in_one_line(experiment, cifar_root, imagenet_root, tmp_path):
    old = tmp_path / "old_mixup.yaml"  # configs/presets/mixup.yaml as it was before the `mixing` argument
    old.write_text(
        "data:\n  init_args:\n    augmentations+:\n      - class_path: resnet_lab.data.MixBatch\n        init_args:\n"
        "          transform: {class_path: torchvision.transforms.v2.MixUp, init_args: {alpha: 0.2}}\n"
    )
    config = CONFIGS / f"{experiment}.yaml"
    with pytest.raises(SystemExit) as refusal:
        main(["fit", "--config", str(config), "--config", str(old), *data_for(config, cifar_root, imagenet_root)])
    assert str(refusal.value.code) == (
        "error: MixBatch mixes images and their labels, after the normalisation: it is not one of "
        "data.init_args.augmentations; move it to data.init_args.mixing (configs/presets/mixup.yaml shows how)"
    )
    assert not Path("logs").exists()
