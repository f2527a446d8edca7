"""The paper's training protocol: the warm-up switch, the plateau schedule, and what every run logs."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback

from conftest import quiet_trainer
from resnet_lab import CifarResNet, ImageClassifier
from resnet_lab.callbacks import SpeedMonitor, WarmupUntilTrainError
from resnet_lab.data import SyntheticDataModule
from resnet_lab.errors import ConfigError
from resnet_lab.records import cpu_has_bf16
from resnet_lab.schedules import WarmupMultiStepLR


class Recorder(Callback):
    """The lr each iteration ran at and the training error it logged."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.errors: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.errors.append(float(outputs["err_top1"]))


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def fit(model, tmp_path, callbacks, max_steps: int, data=None, **kwargs) -> L.Trainer:
    trainer = quiet_trainer(tmp_path, max_steps=max_steps, callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=data or SyntheticDataModule(train_size=1024, val_size=64, batch_size=32))
    return trainer


def test_warmup_ends_when_the_running_training_error_falls_below_the_threshold(tmp_path):
    L.seed_everything(0)

    def schedule(optimizer):
        return WarmupMultiStepLR(optimizer, milestones=[10_000], warmup_steps=None, warmup_factor=0.1)

    model = ImageClassifier(CifarResNet(8), optimizer=sgd, lr_scheduler=schedule)
    recorder, switch = Recorder(), WarmupUntilTrainError(threshold=80.0, window=5)
    fit(model, tmp_path, [switch, recorder], max_steps=60, limit_val_batches=0)
    scheduler = model.trainer.lr_scheduler_configs[0].scheduler
    end = scheduler.warmup_end
    assert end is not None and 5 <= end < 60
    # The first iteration whose 5-iteration running error is below 80% is the last at 0.01.
    running = [sum(recorder.errors[i - 4 : i + 1]) / 5 for i in range(4, len(recorder.errors))]
    first_below = next(i for i, e in enumerate(running) if e < 80.0) + 4
    assert end == first_below + 1
    assert recorder.lrs[:end] == pytest.approx([0.01] * end)
    assert recorder.lrs[end:] == pytest.approx([0.1] * (60 - end))
    assert max(recorder.errors[:5]) > 80.0  # it did start above the threshold


def test_warmup_switch_needs_a_warmup_scheduler(tmp_path):
    model = ImageClassifier(CifarResNet(8), optimizer=sgd)
    with pytest.raises(ConfigError, match="needs a scheduler with end_warmup"):
        fit(model, tmp_path, [WarmupUntilTrainError()], max_steps=2)


def warmup_until_told(optimizer):
    return WarmupMultiStepLR(optimizer, milestones=[10_000], warmup_steps=None, warmup_factor=0.1)


def test_an_open_ended_warmup_that_nothing_ends_is_refused(tmp_path):
    model = ImageClassifier(CifarResNet(8), optimizer=sgd, lr_scheduler=warmup_until_told)
    with pytest.raises(ConfigError, match="no callback ends the warm-up: add .*WarmupUntilTrainError"):
        fit(model, tmp_path, [], max_steps=2)


def test_a_run_resumed_during_the_warmup_keeps_its_running_error(tmp_path):
    L.seed_everything(0)
    model = ImageClassifier(CifarResNet(8), optimizer=sgd, lr_scheduler=warmup_until_told)
    first = WarmupUntilTrainError(threshold=0.0, window=20)  # never ends here
    trainer = fit(model, tmp_path, [first], max_steps=6, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "warming.ckpt")
    assert len(first.errors) == 6
    resumed = WarmupUntilTrainError(threshold=0.0, window=20)
    model = ImageClassifier(CifarResNet(8), optimizer=sgd, lr_scheduler=warmup_until_told)
    trainer = quiet_trainer(tmp_path, max_steps=8, callbacks=[resumed], limit_val_batches=0)
    trainer.fit(model, datamodule=SyntheticDataModule(train_size=1024, val_size=64, batch_size=32),
                ckpt_path=tmp_path / "warming.ckpt")  # fmt: skip
    assert resumed.errors[:6] == first.errors and len(resumed.errors) == 8


def test_plateau_schedule_divides_the_lr_when_validation_error_stalls(tmp_path):
    # A threshold no run can meet: every validation after the first counts as a plateau.
    def plateau(optimizer):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=0, threshold=0.99)

    model = ImageClassifier(
        CifarResNet(8),
        optimizer=sgd,
        lr_scheduler=plateau,
        scheduler_interval="epoch",
        scheduler_monitor="val/err_top1",
    )
    data = SyntheticDataModule(train_size=64, val_size=32, batch_size=32)
    trainer = fit(model, tmp_path, [], max_steps=-1, data=data, max_epochs=4)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1**3)
    assert trainer.lr_scheduler_configs[0].monitor == "val/err_top1"


def test_speed_monitor_logs_throughput_and_epoch_time(tmp_path):
    model = ImageClassifier(CifarResNet(8), optimizer=sgd)
    trainer = fit(model, tmp_path, [SpeedMonitor()], max_steps=8, log_every_n_steps=2, limit_val_batches=0)
    metrics = trainer.callback_metrics
    assert metrics["perf/images_per_s"] > 0 and metrics["perf/epoch_time_s"] > 0


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_bf16_warns_in_one_line_exactly_on_a_cpu_without_bf16_instructions(tmp_path, precision):
    if cpu_has_bf16() is None:
        pytest.skip("this system's CPU flags cannot be read")
    model = ImageClassifier(CifarResNet(8), optimizer=sgd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, tmp_path, [SpeedMonitor()], max_steps=2, limit_val_batches=0, precision=precision)
    said = [str(w.message) for w in caught if "bfloat16 instructions" in str(w.message)]
    assert len(said) == (precision == "bf16-mixed" and not cpu_has_bf16())
    assert all("\n" not in line and "32-true" in line for line in said)
