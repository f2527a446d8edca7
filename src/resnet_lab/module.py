"""`ImageClassifier`: the LightningModule that trains any backbone with cross-entropy and reports top-k error."""

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from resnet_lab.errors import ConfigError

STAGES = ("train", "val", "test")


def _accuracy_metrics(num_classes: int) -> MetricCollection:
    metrics = {"acc_top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


class ImageClassifier(L.LightningModule):
    """Image classification with a backbone, an optimizer and a learning-rate schedule.

    Logs `{train,val,test}/loss`, `.../acc_top1`, `.../acc_top5` and the matching error in percent
    (`.../err_top1`, `.../err_top5`: the paper's tables are in error %). Training metrics are logged per
    iteration (the paper plots against iterations) and per epoch; validation and test metrics per epoch.

    Args:
        backbone: a network mapping images to logits, exposing `num_classes` (e.g. `CifarResNet`).
        optimizer: builds the optimizer from the parameters, e.g. SGD with lr 0.1, momentum 0.9, wd 1e-4.
        lr_scheduler: builds the schedule from the optimizer; None keeps the learning rate constant.
        scheduler_interval: "step" advances the schedule every iteration (the paper's CIFAR milestones are
            iterations), "epoch" once per epoch.
        scheduler_monitor: metric a `ReduceLROnPlateau` schedule watches.
    """

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        scheduler_monitor: str = "val/err_top1",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        num_classes = getattr(backbone, "num_classes", None)
        if not isinstance(num_classes, int):
            raise ConfigError(f"the backbone {type(backbone).__name__} must expose an integer `num_classes`")
        self.backbone = backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.train_metrics = _accuracy_metrics(num_classes)
        self.val_metrics = _accuracy_metrics(num_classes)
        self.test_metrics = _accuracy_metrics(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        if on_step:
            # forward() updates the epoch state and returns this batch's value; logging a tensor does not sync.
            for name, acc in metrics(logits, labels).items():
                self._log_accuracy(f"{stage}/{name}", acc, on_step=True)
        else:
            metrics.update(logits, labels)
        return loss

    def _log_accuracy(self, name: str, acc: Tensor, on_step: bool) -> None:
        prog_bar = name.endswith("top1") and not on_step
        for key, value in ((name, acc), (name.replace("acc_", "err_"), 100.0 * (1.0 - acc))):
            self.log(key, value, on_step=on_step, on_epoch=not on_step, prog_bar=prog_bar)

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        # compute() reduces over all processes, so the logged value is already global.
        for name, acc in metrics.compute().items():
            self._log_accuracy(f"{stage}/{name}_epoch" if stage == "train" else f"{stage}/{name}", acc, on_step=False)
        metrics.reset()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=1)

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def configure_optimizers(self):  # noqa: ANN201 - Lightning accepts several return shapes
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = {
            "scheduler": self.lr_scheduler(optimizer),
            "interval": self.scheduler_interval,
            "monitor": self.scheduler_monitor,
        }
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
