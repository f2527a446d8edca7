"""The fast paths (device-resident CIFAR batches, channels_last, torch.compile) compute the same thing."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import HostSyncs, SyncsPerIteration, quiet_trainer, transformed
from resnet_lab import CifarResNet, ImageClassifier
from resnet_lab.callbacks import ThrottledProgressBar
from resnet_lab.data import CIFAR10DataModule, SyntheticDataModule
from resnet_lab.data.base import Standardize
from resnet_lab.data.batches import BatchOrder, BatchTransforms, DeviceBatches, PadCropFlip


def test_random_crop_flip_takes_windows_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8, generator=g)
    augmentation = PadCropFlip(2)
    out = augmentation.apply(images, augmentation.draw(len(images), g))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    offsets, flips = [], 0
    for i in range(len(images)):
        for flip in (False, True):
            view = out[i].flip(-1) if flip else out[i]
            hits = [(y, x) for y in range(5) for x in range(5) if torch.equal(padded[i, :, y : y + 8, x : x + 8], view)]
            if hits:
                offsets.append(hits[0])
                flips += flip
                break
        else:
            pytest.fail(f"image {i} is not a window of its padded image")
    # Offsets uniform over the 25 windows, half the images mirrored (as RandomCrop + RandomHorizontalFlip).
    counts = torch.bincount(torch.tensor([5 * y + x for y, x in offsets]), minlength=25)
    assert counts.min() >= 5 and counts.max() <= 30
    assert 150 <= flips <= 250


def batches(train: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> DeviceBatches:
    images = torch.arange(100, dtype=torch.uint8)[:, None, None, None].expand(100, 3, 4, 4).contiguous()
    return DeviceBatches(images, torch.arange(100), BatchOrder(100, 8, train, seed, rank, world_size))


def test_device_batches_shuffle_per_epoch_reproducibly_and_shard():
    loader = batches(train=True, seed=3)
    first = torch.cat([y for _, y, _ in loader])
    assert len(loader) == 12 and len(first) == 96 and len(set(first.tolist())) == 96
    assert torch.equal(first, torch.cat([y for _, y, _ in loader]))  # same epoch, same order
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, torch.cat([y for _, y, _ in loader]))
    shards = [torch.cat([y for _, y, _ in batches(train=True, seed=3, rank=r, world_size=3)]) for r in range(3)]
    assert [len(s) for s in shards] == [32, 32, 32]  # equal numbers of batches on every process
    assert len(set(torch.cat(shards).tolist())) == 96
    evaluation = [torch.cat([y for _, y, _ in batches(train=False, rank=r, world_size=3)]) for r in range(3)]
    assert sorted(torch.cat(evaluation).tolist()) == list(range(100))
    x, y, key = next(iter(batches(train=False)))
    normalize = Standardize(torch.zeros(1), torch.ones(1))
    x, _ = BatchTransforms([PadCropFlip(1)], normalize, 10)(x, y, key)  # evaluation batches are not augmented
    assert x.dtype == torch.float32 and x[1, 0, 0, 0] == pytest.approx(1 / 255) and x[1].eq(1 / 255).all()


def test_device_and_dataloader_paths_give_the_same_evaluation_batches(cifar_root):
    def data(loader):
        dm = CIFAR10DataModule(
            root=str(cifar_root), batch_size=16, val_size=50, num_workers=0, download=False, loader=loader
        )
        dm.setup("fit")
        return dm

    device, reference = data("device"), data("dataloader")
    a, b = transformed(device, device.val_dataloader()), transformed(reference, reference.val_dataloader())
    pairs = zip(a, b, strict=True)
    for (_, x1, y1), (_, x2, y2) in pairs:
        torch.testing.assert_close(x1, x2)
        assert torch.equal(y1, y2)
    assert len(device.train_dataloader()) == len(reference.train_dataloader()) == 150 // 16


def train_losses(tmp_path, **switches) -> list[float]:
    L.seed_everything(0)
    model = ImageClassifier(CifarResNet(8), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), **switches)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = quiet_trainer(tmp_path, max_steps=6, callbacks=[Record()])
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    return losses


def test_channels_last_gives_the_same_losses(tmp_path):
    reference = train_losses(tmp_path)
    assert train_losses(tmp_path, channels_last=True) == pytest.approx(reference, rel=1e-4, abs=1e-5)


def test_compiled_backbone_trains_and_keeps_its_checkpoint_keys(tmp_path):
    reference = train_losses(tmp_path)
    assert train_losses(tmp_path, compile=True, compile_backend="aot_eager") == pytest.approx(reference, rel=1e-4)
    model = ImageClassifier(CifarResNet(8), compile=True, compile_backend="aot_eager")
    assert list(model.state_dict())[0] == "backbone.conv1.weight"


def test_activation_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    plain, checkpointed = CifarResNet(14), CifarResNet(14, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    saved = {}
    for net in (plain, checkpointed):
        # What the forward pass keeps for the backward pass: the memory that checkpointing trades for compute.
        saved[net] = 0

        def pack(t: torch.Tensor, net: torch.nn.Module = net) -> torch.Tensor:
            saved[net] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
    assert saved[checkpointed] < saved[plain] / 2, saved
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # BN running statistics are updated once per step, not again by the recomputation.
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(a, b, msg=name)
    checkpointed.eval()
    torch.testing.assert_close(checkpointed(x), plain.eval()(x))


def test_evaluation_of_a_compiled_model_does_not_compile(tmp_path):
    # Validation batches end short and test views vary in size: each new shape would be another compilation.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = ImageClassifier(CifarResNet(8), compile=True, compile_backend="aot_eager")
    x, y = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    quiet_trainer(tmp_path).validate(model, DataLoader(TensorDataset(x, y), batch_size=16))  # 16, 16, 8
    assert counters["stats"]["unique_graphs"] == 0
    model.train()
    model(x[:4]).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1  # training does compile


class Augmented:
    """DeviceBatches of 64 random 8x8 images, pad-2 crop-flipped with seed 5, as the data module transforms them."""

    def __init__(self, rank: int = 0, world_size: int = 1, batch_size: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
        self.rank, self.world_size = rank, world_size
        self.loader = DeviceBatches(images, torch.arange(64), BatchOrder(64, batch_size, True, 5, rank, world_size))
        self.transforms = BatchTransforms([PadCropFlip(2)], Standardize(torch.zeros(1), torch.ones(1)), 64)

    def __iter__(self):  # noqa: ANN204
        for images, labels, key in self.loader:
            yield self.transforms(images, labels, key, self.rank, self.world_size)


def test_processes_share_each_global_batch_and_its_augmentation():
    single = list(Augmented(batch_size=8))
    shares = [list(Augmented(rank, 2, batch_size=4)) for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(single) == 8
    for (x, y), (x0, y0), (x1, y1) in zip(single, *shares, strict=True):
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)  # distinct shares, together the batch
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)  # with the very same crops and flips


def test_a_loader_restored_mid_epoch_continues_with_the_same_batches():
    reference = Augmented()
    reference.loader.sampler.set_epoch(2)
    expected = list(reference)
    interrupted = Augmented()
    interrupted.loader.sampler.set_epoch(2)
    stream = iter(interrupted)
    for _ in range(3):
        next(stream)
    state = interrupted.loader.state_dict()  # what a checkpoint written after the third iteration holds
    resumed = Augmented()
    resumed.loader.load_state_dict(state)
    resumed.loader.sampler.set_epoch(2)  # Lightning sets the epoch before iterating
    rest = list(resumed)
    assert len(rest) == len(expected) - 3
    for (x, y), (xr, yr) in zip(expected[3:], rest, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    resumed.loader.sampler.set_epoch(3)  # the next epoch starts from its beginning
    assert len(list(resumed)) == len(expected)


class TrainingBarAtValidation(L.Callback):
    """What the training bar shows during each validation, and how many iterations were done by then."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and batch_idx == 0:
            self.seen.append((trainer.progress_bar_callback.train_progress_bar.n, trainer.global_step))


@pytest.mark.parametrize("interval_s", [0.0, 3600.0])
def test_the_progress_bar_redraws_at_most_once_per_interval_and_shows_the_true_count(interval_s, tmp_path, capsys):
    steps = 30  # a validation every 10 iterations (the bar counts to max_steps)
    at_validation = TrainingBarAtValidation()
    trainer = quiet_trainer(
        tmp_path,
        max_steps=steps,
        val_check_interval=10,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=True,
        callbacks=[ThrottledProgressBar(interval_s), at_validation],
    )
    model = ImageClassifier(CifarResNet(8), optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    trainer.fit(model, datamodule=SyntheticDataModule(train_size=128, val_size=16, batch_size=2))
    assert at_validation.seen == [(10, 10), (20, 20), (30, 30)]  # never a stale count under the validation bar
    printed = capsys.readouterr().out
    assert f"| {steps}/{steps} " in printed.split("Epoch 0:")[-1]  # the last redraw shows every iteration done
    redraws = printed.count("Epoch 0:")  # a redraw: a new position, or new figures after it
    if interval_s == 0:
        assert redraws >= steps  # as the stock bar: after every iteration
    else:
        assert redraws <= 15


def test_an_iteration_makes_the_host_wait_only_where_the_loggers_write(tmp_path, cifar_root):
    from resnet_lab.callbacks import (
        CheckpointOnSignal,
        PeriodicCheckpoint,
        SpeedMonitor,
        StopOnNonFiniteLoss,
        ValidateAtMaxSteps,
    )
    from resnet_lab.notebook import TensorBoardNotebook

    L.seed_everything(0)
    data = CIFAR10DataModule(root=str(cifar_root), batch_size=8, val_size=50, num_workers=0, download=False)
    model = ImageClassifier(CifarResNet(8), optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    syncs = SyncsPerIteration()
    callbacks = [
        ValidateAtMaxSteps(), SpeedMonitor(), StopOnNonFiniteLoss(), CheckpointOnSignal(), PeriodicCheckpoint(),
        L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"), TensorBoardNotebook(), syncs,
    ]  # fmt: skip
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, default_hp_metric=False)
    trainer = quiet_trainer(tmp_path, max_steps=12, log_every_n_steps=5, callbacks=callbacks, logger=logger,
                            limit_val_batches=0)  # fmt: skip
    trainer.fit(model, datamodule=data)
    logging_steps = {5, 10, 12}
    assert set(syncs.per_step) == set(range(1, 13))
    assert syncs.between_logging(logging_steps) == {}
    assert all(syncs.per_step[step] for step in (5, 10))  # positive control: the NaN check reads its flag there
    # The batch transforms (augmentation and normalisation, in on_after_batch_transfer) wait for nothing either.
    raw = next(iter(data.train_dataloader()))
    with HostSyncs() as mode:
        data.on_after_batch_transfer(raw, 0)
    assert mode.ops == []
