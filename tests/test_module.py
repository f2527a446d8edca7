import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer, transformed
from resnet_lab import CifarResNet, ImageClassifier
from resnet_lab.callbacks import ValidateAtMaxSteps
from resnet_lab.data import SyntheticDataModule
from resnet_lab.errors import ConfigError
from resnet_lab.schedules import WarmupMultiStepLR


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def test_training_lowers_the_loss_and_logs_errors(tmp_path):
    L.seed_everything(0)
    model = ImageClassifier(CifarResNet(8), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    data = SyntheticDataModule(train_size=512, val_size=128, batch_size=32)
    data.setup("fit")
    _, images, labels = transformed(data, data.val_dataloader())[0]
    with torch.no_grad():
        model.eval()
        loss_before = torch.nn.functional.cross_entropy(model(images), labels)
    model.train()
    t = quiet_trainer(tmp_path, max_epochs=3, log_every_n_steps=4)
    t.fit(model, datamodule=data)
    with torch.no_grad():
        model.eval()
        loss_after = torch.nn.functional.cross_entropy(model(images), labels)
    assert loss_after < 0.6 * loss_before
    metrics = t.callback_metrics
    for key in (
        "train/loss",
        "train/loss_epoch",
        "train/err_top1",
        "train/err_top1_epoch",
        "train/acc_top1_epoch",
        "val/loss",
        "val/acc_top1",
        "val/err_top1",
        "val/acc_top5",
        "val/err_top5",
    ):
        assert key in metrics, key
    assert metrics["val/err_top1"].item() == pytest.approx(100 * (1 - metrics["val/acc_top1"].item()), abs=1e-4)


def test_validation_error_equals_a_hand_count(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(CifarResNet(8, num_classes=6), optimizer=sgd).eval()
    x, y = torch.randn(50, 3, 32, 32), torch.randint(0, 6, (50,))
    [result] = quiet_trainer(tmp_path).validate(model, DataLoader(TensorDataset(x, y), batch_size=16))
    with torch.no_grad():
        logits = model(x)
    top1 = (logits.argmax(1) == y).float().mean().item()
    top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(1).float().mean().item()
    assert result["val/err_top1"] == pytest.approx(100 * (1 - top1), abs=1e-4)
    assert result["val/err_top5"] == pytest.approx(100 * (1 - top5), abs=1e-4)
    assert result["val/loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-3)


def test_fewer_than_five_classes_reports_top1_only(tmp_path):
    model = ImageClassifier(CifarResNet(8, num_classes=2))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,))
    [result] = quiet_trainer(tmp_path).test(model, DataLoader(TensorDataset(x, y), batch_size=4))
    assert "test/err_top1" in result and "test/err_top5" not in result


def test_warmup_multistep_schedule_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = WarmupMultiStepLR(opt, milestones=[5, 8], warmup_steps=3, warmup_factor=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01] * 3 + [0.1] * 2 + [0.01] * 3 + [0.001] * 2)


def test_scheduler_steps_every_iteration_inside_fit(tmp_path):
    def milestones(optimizer):
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 6], gamma=0.1)

    model = ImageClassifier(CifarResNet(8), optimizer=sgd, lr_scheduler=milestones, scheduler_interval="step")
    data = SyntheticDataModule(train_size=64, val_size=16, batch_size=8)
    quiet_trainer(tmp_path, max_steps=7, limit_val_batches=0).fit(model, datamodule=data)
    # 7 optimizer steps in one epoch of 8 batches: an epoch-wise schedule would still be at 0.1.
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001)


def test_predict_returns_probabilities(tmp_path):
    model = ImageClassifier(CifarResNet(8))
    x = torch.randn(6, 3, 32, 32)
    [probs] = quiet_trainer(tmp_path).predict(model, DataLoader(TensorDataset(x), batch_size=6))
    assert probs.shape == (6, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(6))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_curves_log_the_mean_of_each_logging_window(tmp_path, accumulate):
    L.seed_everything(0)
    model = ImageClassifier(CifarResNet(8), optimizer=sgd)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    losses, errors = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)  # Lightning divides it for backward
            errors.append(float(outputs["err_top1"]))

    logger = CSVLogger(tmp_path, name="run")
    callbacks = [Record(), ValidateAtMaxSteps()]  # as in every CLI run: it makes Lightning write the last step
    trainer = quiet_trainer(
        tmp_path, max_steps=10, log_every_n_steps=4, logger=logger, callbacks=callbacks,
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
    logged = {int(r["step"]): (float(r["train/loss"]), float(r["train/err_top1"])) for r in rows if r["train/loss"]}
    # Every 4th optimizer step, and the last one; with accumulation a step's window holds all its micro-batches.
    a = accumulate
    windows = {3: slice(0, 4 * a), 7: slice(4 * a, 8 * a), 9: slice(8 * a, 10 * a)}
    assert sorted(logged) == sorted(windows)
    for step, window in windows.items():
        assert logged[step][0] == pytest.approx(sum(losses[window]) / len(losses[window]), rel=1e-5)
        assert logged[step][1] == pytest.approx(sum(errors[window]) / len(errors[window]), rel=1e-5)
    [epoch0] = [r for r in rows if r["train/loss_epoch"]][:1]
    assert float(epoch0["train/loss_epoch"]) == pytest.approx(sum(losses[:8]) / 8, rel=1e-5)
    assert float(epoch0["train/err_top1_epoch"]) == pytest.approx(sum(errors[:8]) / 8, rel=1e-5)
    assert float(epoch0["train/acc_top1_epoch"]) == pytest.approx(1 - sum(errors[:8]) / 800, rel=1e-5)


def test_a_backbone_built_in_python_is_not_a_hyperparameter(tmp_path):
    # As a hyperparameter the module would be pickled into each checkpoint a second time and dumped as text into
    # hparams.yaml by the logger (minutes for a ResNet-50).
    torch.manual_seed(0)
    model = ImageClassifier(CifarResNet(8), optimizer=sgd)
    assert not {"backbone", "optimizer"} & (set(model.hparams) | set(model.hparams_initial))
    data = SyntheticDataModule(train_size=64, val_size=32, batch_size=32)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run")
    trainer = quiet_trainer(tmp_path, max_steps=2, logger=logger, enable_checkpointing=True)
    trainer.fit(model, datamodule=data)
    [hparams] = tmp_path.glob("run/version_0/hparams.yaml")
    assert "backbone" not in hparams.read_text() and hparams.stat().st_size < 1000
    [checkpoint] = tmp_path.glob("run/version_0/checkpoints/*.ckpt")
    restored = ImageClassifier.load_from_checkpoint(checkpoint, backbone=CifarResNet(8))  # weights_only loads it
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


def test_a_checkpoint_of_the_old_graph_step_setting_loads_and_says_what_replaced_it(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(CifarResNet(8), optimizer=sgd)
    trainer = quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    trainer.fit(model, datamodule=SyntheticDataModule(train_size=32, val_size=32, batch_size=32))
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    old = torch.load(tmp_path / "old.ckpt", weights_only=True)
    old["hyper_parameters"]["graph_step"] = True  # as the gpu_graph preset wrote it before GraphStepClassifier
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="graph_step=True is ignored: .*GraphStepClassifier"):
        restored = ImageClassifier.load_from_checkpoint(tmp_path / "old.ckpt", backbone=CifarResNet(8))
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


def test_the_loss_is_an_argument(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(CifarResNet(8, num_classes=6), optimizer=sgd, loss=torch.nn.MultiMarginLoss())
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 6, (16,))
    loss, _ = model.loss_and_means(x, y)
    assert loss.item() == pytest.approx(torch.nn.MultiMarginLoss()(model(x), y).item(), rel=1e-5)
    assert loss.item() != pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item(), rel=1e-3)
    with pytest.raises(ConfigError, match="label_smoothing 0.1 is an argument of the default loss"):
        ImageClassifier(CifarResNet(8), loss=torch.nn.CrossEntropyLoss(), label_smoothing=0.1)


class Outputs(L.Callback):
    """What validation_step hands a callback: the log-probabilities it computed, with the batch's labels."""

    def __init__(self) -> None:
        self.log_probs, self.labels = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.log_probs.append(outputs["log_probs"])
        self.labels.append(batch[1])


def test_evaluation_metrics_are_an_argument_and_see_the_step_outputs(tmp_path):
    from torchmetrics.classification import MulticlassCalibrationError

    torch.manual_seed(0)
    ece = MulticlassCalibrationError(6, n_bins=10)
    model = ImageClassifier(CifarResNet(8, num_classes=6), optimizer=sgd, metrics={"ece": ece}).eval()
    x, y = torch.randn(50, 3, 32, 32), torch.randint(0, 6, (50,))
    outputs = Outputs()
    [result] = quiet_trainer(tmp_path, callbacks=[outputs]).validate(
        model, DataLoader(TensorDataset(x, y), batch_size=16)
    )
    log_probs, labels = torch.cat(outputs.log_probs), torch.cat(outputs.labels)
    with torch.no_grad():
        assert torch.allclose(log_probs, model(x).log_softmax(1), atol=1e-6)  # no second pass needed
    expected = MulticlassCalibrationError(6, n_bins=10)(log_probs.exp(), labels)
    assert result["val/ece"] == pytest.approx(expected.item(), abs=1e-6)
    assert {"val/acc_top1", "val/err_top1", "val/acc_top5", "val/err_top5"} <= set(result)  # the paper's kept
    assert ece.update_count == 0  # the argument is a template: each stage evaluates its own copy
