"""The recipe switches (issue 14), each a preset stacked on an experiment: every one fits a few real iterations and
shows its effect."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import CONFIGS, QUIET, quiet_trainer
from resnet_lab import ImageClassifier
from resnet_lab.cli import ResNetLabCLI, main
from resnet_lab.schedules import WarmupCosineLR

PRESETS = CONFIGS / "presets"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # each run's folder under logs/ of the test's own folder, not the repository's


def experiment(cifar_root: Path, *presets: str, extra: tuple[str, ...] = ()) -> list[str]:
    """ResNet-8 on the small on-disk CIFAR with `presets` stacked on the ResNet-20 experiment."""
    stacked = [flag for name in presets for flag in ("--config", str(PRESETS / f"{name}.yaml"))]
    return ["--config", str(CONFIGS / "resnet20_cifar.yaml"), *stacked, "--data.root", str(cifar_root),
            "--data.val_size", "50", "--data.batch_size", "16", "--data.num_workers", "0",
            "--model.backbone.init_args.depth", "8", "--trainer.limit_val_batches", "1", *QUIET, *extra]  # fmt: skip


class Oracle(nn.Module):
    """Logits that rank the true class first by a wide margin: the label is written into each image."""

    def __init__(self) -> None:
        super().__init__()
        self.margin = nn.Parameter(torch.tensor(30.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.margin * F.one_hot(x[:, 0, 0, 0].long(), 10).float()


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_smoothing_keeps_the_loss_of_a_perfect_prediction_positive(tmp_path, smoothing):
    labels = torch.arange(16) % 10
    images = labels.float()[:, None, None, None].expand(16, 3, 4, 4).contiguous()
    model = ImageClassifier(Oracle(), optimizer=torch.optim.SGD, label_smoothing=smoothing)
    losses = Losses()
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[losses], limit_val_batches=0)
    trainer.fit(model, DataLoader(TensorDataset(images, labels), batch_size=8))
    expected = smoothing * (1 - 1 / 10) * 30.0  # the smoothed target's excess loss over a one-hot margin of 30
    if smoothing:
        assert losses.values[0] == pytest.approx(expected, rel=0.05) and losses.values[0] > 1.0
    else:
        assert losses.values[0] < 1e-9


def test_cosine_follows_its_warmup_then_the_cosine_over_the_run(cifar_root, tmp_path, monkeypatch):
    steps = ("--trainer.max_steps", "9", "--trainer.log_every_n_steps", "1")
    main(["fit", *experiment(cifar_root, "cosine", extra=(*steps, "--model.lr_scheduler.init_args.warmup_steps", "3"))])
    events = EventAccumulator(str(tmp_path / "logs" / "resnet20_cifar" / "version_0")).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("lr-SGD")]
    schedule = WarmupCosineLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 3, 0.01, total_steps=9)
    expected = [0.1 * schedule.factor(step) for step in range(9)]  # 0.001, 0.034, 0.067, then the cosine
    assert [step for step, _ in logged] == list(range(9))
    assert [value for _, value in logged] == pytest.approx(expected, rel=1e-5)
    assert expected[3] == pytest.approx(0.1) and expected[-1] < 0.01  # the peak after warm-up; towards zero


def test_cosine_takes_its_length_from_the_run_and_refuses_one_shorter_than_its_warmup(cifar_root, tmp_path):
    with pytest.raises(SystemExit, match=r"error: WarmupCosineLR needs 0 <= warmup_steps < total_steps: got 1000"):
        main(["fit", *experiment(cifar_root, "cosine", extra=("--trainer.max_steps", "5"))])


def test_no_norm_weight_decay_exempts_exactly_the_norm_parameters_and_the_biases(cifar_root):
    cli = ResNetLabCLI(
        args=experiment(cifar_root, "no_norm_weight_decay", extra=("--trainer.max_steps", "2")), run=False
    )
    decayed, exempt = cli.model.parameter_groups()
    names = {id(p): n for n, p in cli.model.named_parameters()}
    batchnorm = {n for n, m in cli.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    expected = {n for n in names.values() if n.rpartition(".")[0] in batchnorm or n.endswith(".bias")}
    assert {names[id(p)] for p in exempt["params"]} == expected and "backbone.fc.bias" in expected
    assert exempt["weight_decay"] == 0.0 and all(p.ndim == 4 or p.ndim == 2 for p in decayed["params"])
    cli.trainer.fit(cli.model, cli.datamodule)
    groups = cli.trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]  # the recipe's decay on the rest


class GradientNorms(Callback):
    """The gradients' global norm that the optimizer stepped with (after any clipping: the closure that computes
    and clips them runs inside `optimizer.step`, so a post-hook sees them) and before Lightning clips them."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.stepped: list[float] = []

    @staticmethod
    def norm(module: nn.Module) -> float:
        return float(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
        )

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.stepped.append(self.norm(pl_module)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(self.norm(pl_module))  # Lightning clips after this hook


def test_grad_clip_bounds_the_gradient_norm(cifar_root):
    cli = ResNetLabCLI(args=experiment(cifar_root, "grad_clip", extra=("--trainer.max_steps", "4")), run=False)
    norms = GradientNorms()
    cli.trainer.callbacks.append(norms)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(norms.stepped) == 4 and max(norms.stepped) <= 1.0 + 1e-4
    assert max(norms.before) > 1.0  # the clip acted: these gradients are larger unclipped


def test_ema_averages_the_weights_and_a_resume_goes_on_exactly(cifar_root, tmp_path, monkeypatch):
    run = experiment(cifar_root, "ema", extra=("--trainer.limit_train_batches", "4", "--trainer.deterministic", "true"))
    # Straight through 6 iterations (across an epoch boundary), keeping the state after iteration 3 as well.
    every_3 = ["--checkpoint.every_n_train_steps", "3", "--checkpoint.save_top_k", "-1", "--checkpoint.monitor", "null"]
    main(["fit", *run, "--trainer.max_steps", "6", *every_3])
    straight = tmp_path / "logs" / "resnet20_cifar" / "version_0" / "checkpoints"
    main(["fit", *run, "--trainer.max_steps", "6", "--ckpt_path", str(straight / "best-step3.ckpt")])
    ends = [
        torch.load(folder / "last.ckpt", weights_only=False)
        for folder in (straight, straight.parents[1] / "version_1" / "checkpoints")
    ]
    assert ends[0]["global_step"] == ends[1]["global_step"] == 6
    for key in ("state_dict", "current_model_state"):  # the average, and the live weights beside it
        for name, value in ends[0][key].items():
            assert torch.equal(value, ends[1][key][name]), (key, name)
    average, live = ends[0]["state_dict"], ends[0]["current_model_state"]
    assert not torch.equal(average["backbone.fc.weight"], live["backbone.fc.weight"])
    # Six updates of decay 0.999 leave the average near where training began (the average after iteration 3 stands
    # in for the initial weights, which no file keeps), while the live weights have moved on.
    early = torch.load(straight / "best-step3.ckpt", weights_only=False)["state_dict"]["backbone.conv1.weight"]
    assert (average["backbone.conv1.weight"] - early).norm() < (live["backbone.conv1.weight"] - early).norm() / 10


@pytest.mark.parametrize(
    ("preset", "transform"),
    [("trivialaugment", "TrivialAugmentWide"), ("randaugment", "RandAugment"), ("autoaugment", "AutoAugment"),
     ("random_erasing", "RandomErasing")],
)  # fmt: skip
def test_each_image_draws_its_own_augmentation_and_only_from_its_batch_key(cifar_root, preset, transform):
    cli = ResNetLabCLI(args=experiment(cifar_root, preset), run=False)
    augmentations = cli.datamodule.augmentations
    assert type(augmentations[0]).__name__ == "PadCropFlip" and type(augmentations[-1]).__name__ == "EachImage"
    assert type(augmentations[-1].transform).__name__ == transform  # after the paper's pad-crop-flip
    each = augmentations[-1]
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
    batch = image.expand(64, 3, 32, 32).contiguous()  # one image, 64 times
    key = 12345

    def augmented(images: torch.Tensor, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        draws = each.draw(len(images) * world_size, torch.Generator().manual_seed(key))[rank::world_size]
        return each.apply(images, draws)

    out = augmented(batch)
    distinct = {tuple(x.flatten().tolist()) for x in out}
    assert len(distinct) > (8 if preset == "random_erasing" else 16)  # not one random op for the whole batch
    assert torch.equal(out, augmented(batch))  # a function of the batch key: a resumed run redraws the same
    torch.manual_seed(99)  # whatever the global generator holds
    shares = [augmented(batch[r::2], rank=r, world_size=2) for r in (0, 1)]  # two processes, one global batch
    assert torch.equal(torch.stack(shares, 1).flatten(0, 1), out)
    if preset == "random_erasing":
        erased = [(x == 0).all(dim=0).any() and not torch.equal(x, image) for x in out]
        assert 16 < sum(erased) < 48  # about half, each with a black rectangle of its own


@pytest.mark.parametrize("preset", ["mixup", "cutmix"])
def test_mixing_gives_convex_combinations_of_neighbours_with_matching_soft_labels(cifar_root, preset):
    from resnet_lab.data import BatchTransforms, MixBatch

    cli = ResNetLabCLI(args=experiment(cifar_root, preset), run=False)
    data = cli.datamodule
    assert isinstance(data.mixing, MixBatch) and [type(a).__name__ for a in data.augmentations] == ["PadCropFlip"]
    data.setup("fit")
    raw, labels, key = next(iter(data.train_dataloader()))
    before, _ = BatchTransforms(data.augmentations, data.normalize, 10)(raw, labels, key)  # the same draws, not mixed
    images, soft = data.on_after_batch_transfer((raw, labels, key), 0)
    assert soft.shape == (16, 10) and torch.allclose(soft.sum(dim=1), torch.ones(16))
    neighbour = before.roll(1, 0)
    own = soft[torch.arange(16), labels]  # each image's weight on its own label
    other = labels != labels.roll(1, 0)  # images whose neighbour has another label show lambda plainly
    lam = own[other][0]
    assert torch.allclose(own[other], lam) and 0 < lam < 1  # one lambda for the whole batch
    if preset == "mixup":
        torch.testing.assert_close(images, lam * before + (1 - lam) * neighbour)
    else:  # every pixel is the image's own or its neighbour's: a box of them, its area the neighbour's weight
        assert ((images == before).all(dim=1) | (images == neighbour).all(dim=1)).all()
        changed = (images != before).any(dim=1)[other]  # inside the box (where the two images differ)
        rows, cols = changed.any(dim=2), changed.any(dim=1)
        height = rows.shape[1] - rows.int().argmax(1) - rows.flip(1).int().argmax(1)
        width = cols.shape[1] - cols.int().argmax(1) - cols.flip(1).int().argmax(1)
        # One box for the batch; where the two images share zero padding its edge can hide, never grow.
        area = height * width / 32**2
        assert area.max() == pytest.approx(1 - float(lam), abs=1e-6) and (area <= 1 - lam + 1e-6).all()
    assert torch.equal(data.on_after_batch_transfer((raw, labels, key), 0)[0], images)  # from the key alone


def test_repeated_augmentation_deals_each_image_s_copies_out_over_the_processes():
    from collections import Counter

    from resnet_lab.data.base import RepeatedAugmentationSampler

    shares = [RepeatedAugmentationSampler(512, 8, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]

    def images(share: RepeatedAugmentationSampler) -> list[int]:
        return [i for _, batch in share for i in batch.tolist()]

    drawn = [images(s) for s in shares]
    assert [len(d) for d in drawn] == [256, 256]  # an epoch stays one pass of images over both processes
    for share in drawn:
        assert set(Counter(share).values()) <= {1, 2}  # of an image's 4 copies, at most 2 on each process
    assert len(set(drawn[0]) & set(drawn[1])) > 100  # the same images, augmented on both processes
    shares[0].set_epoch(1)
    assert images(shares[0]) != drawn[0] and images(shares[0]) == images(shares[0])  # a new order each epoch, seeded


def test_torchvision_s_resnet50_recipe_mixes_repeats_and_crops_as_it_says(imagenet_root, tmp_path, monkeypatch):
    args = ["--config", str(CONFIGS / "resnet50_imagenet_tv2.yaml"), "--data.root", str(imagenet_root),
            "--data.crop_size", "64", "--data.eval_crop_size", "80", "--data.val_resize", "88",
            "--data.batch_size", "4", "--data.num_workers", "0", "--model.lr_scheduler.init_args.warmup_steps", "1",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            *QUIET]  # fmt: skip
    cli = ResNetLabCLI(args=args, run=False)
    assert cli.config.paper_recipe is False and cli.model.label_smoothing == 0.1

    class Batches(Callback):
        def __init__(self) -> None:
            self.train, self.val = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.train.append(batch)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            self.val.append(batch)

    seen = Batches()
    cli.trainer.callbacks.append(seen)
    cli.trainer.fit(cli.model, cli.datamodule)
    images, labels = seen.train[0]
    assert images.shape == (4, 3, 64, 64) and labels.shape == (4, 6)  # mixed: class probabilities
    assert torch.allclose(labels.sum(dim=1), torch.ones(4))
    assert seen.val[0][0].shape[-2:] == (80, 80) and seen.val[0][1].ndim == 1  # evaluated at its own crop, unmixed
    assert type(cli.trainer.train_dataloader.sampler).__name__ == "RepeatedAugmentationSampler"


def test_our_ema_averages_as_torch_s_without_reading_its_count_from_the_device():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from resnet_lab.callbacks import _HostCountAveragedModel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(2, 3, 8, 8))
    ours = _HostCountAveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    torch_s = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 3, 8, 8))  # moves the BN statistics, which are averaged too
        ours.update_parameters(net)
        torch_s.update_parameters(net)
    assert ours.host_count == int(ours.n_averaged) == 5
    for a, b in zip(ours.state_dict().values(), torch_s.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    resumed = _HostCountAveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    resumed.load_state_dict(ours.state_dict())
    assert resumed.host_count == 5  # a resume goes on averaging rather than copying afresh


def test_the_presets_stacked_wait_on_the_device_only_where_the_loggers_write(cifar_root, tmp_path, monkeypatch):
    """Every preset but the augmentations and the mixing: torchvision's transforms draw their random choices on
    the CPU and read them there (`int(torch.randint(...))`, `float(Beta.sample())`, per image or per batch: host
    time, measured in the benchmark row, but no wait for the device), which a check on a CPU cannot tell from a
    value read off the device."""
    presets = ("label_smoothing", "cosine", "no_norm_weight_decay", "grad_clip", "ema")
    run = experiment(cifar_root, *presets, extra=("--trainer.max_steps", "7", "--trainer.log_every_n_steps", "4",
                     "--trainer.limit_val_batches", "0", "--model.lr_scheduler.init_args.warmup_steps", "2",
                     "--trainer.callbacks+=conftest.SyncsPerIteration"))  # fmt: skip
    cli = ResNetLabCLI(args=["fit", *run])
    syncs = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SyncsPerIteration")
    assert set(syncs.per_step) == set(range(1, 8))
    assert syncs.between_logging({4, 7}) == {}
    assert syncs.per_step[5]  # positive control: after iteration 4's hooks, the NaN check and the loggers read


@pytest.mark.parametrize(
    "preset", ["trivialaugment", "randaugment", "autoaugment", "random_erasing", "mixup", "cutmix"]
)
def test_the_augmentation_and_mixing_presets_never_read_a_value_of_the_batch(cifar_root, preset):
    """Applied to a batch on PyTorch's meta device (shapes without values: reading one raises), each runs through:
    its random choices are drawn and read on the host alone, so on a GPU no image waits for the device."""
    data = ResNetLabCLI(args=experiment(cifar_root, preset), run=False).datamodule
    augmentation = data.mixing or data.augmentations[-1]
    images = torch.empty(16, 3, 32, 32, dtype=torch.uint8, device="meta")
    draws = augmentation.draw(16, torch.Generator().manual_seed(0))
    if augmentation is data.mixing:
        labels = torch.empty(16, dtype=torch.long, device="meta")
        mixed, soft = augmentation.mix(images.float(), labels, draws, 10)
        assert mixed.shape == (16, 3, 32, 32) and soft.shape == (16, 10)
    else:
        assert augmentation.apply(images, draws).shape == (16, 3, 32, 32)
    with pytest.raises(RuntimeError, match="meta"):  # positive control: a value read off the batch does raise
        images.sum().item()
