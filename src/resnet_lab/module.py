"""`ImageClassifier`: the LightningModule that trains any backbone with cross-entropy and reports top-k error."""

import warnings
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from resnet_lab.checkpoints import check_state_dict_matches
from resnet_lab.errors import ConfigError


def _accuracy_metrics(num_classes: int) -> MetricCollection:
    # validate_args=False: the checks call torch.unique on the labels, a host-device sync on every update.
    metrics = {"acc_top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)}
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", validate_args=False)
    return MetricCollection(metrics)


class ImageClassifier(L.LightningModule):
    """Image classification with a backbone, an optimizer and a learning-rate schedule.

    Logs `{train,val,test}/loss`, `.../acc_top1`, `.../acc_top5` and the matching error in percent
    (`.../err_top1`, `.../err_top5`: the paper's tables are in error %). Training loss and top-1 error are also
    logged per iteration (the paper plots against iterations); the training epoch values carry an `_epoch`
    suffix. Validation and test metrics are logged per epoch; they average the softmax over every view the data
    module gives an image (one centre crop, ten crops, or several scales).

    Args:
        backbone: a network mapping images to logits, exposing `num_classes` (e.g. `CifarResNet`).
        optimizer: builds the optimizer from the parameters, e.g. SGD with lr 0.1, momentum 0.9, wd 1e-4.
        lr_scheduler: builds the schedule from the optimizer; None keeps the learning rate constant.
        scheduler_interval: "step" advances the schedule every iteration (the paper's CIFAR milestones are
            iterations), "epoch" once per epoch.
        scheduler_monitor: metric a `ReduceLROnPlateau` schedule watches.
        channels_last: keep weights and inputs in NHWC memory format (faster convolutions on GPUs with tensor
            cores, and on CPUs).
        compile: compile the backbone with `torch.compile` (in place: checkpoints keep their keys).
        compile_mode: `torch.compile` mode, e.g. "max-autotune" or "reduce-overhead" (CUDA graphs).
        compile_backend: `torch.compile` backend: "inductor" generates kernels; "aot_eager" checks that the
            graph captures without generating any (quick, for debugging).
    """

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        scheduler_monitor: str = "val/err_top1",
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default",
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # Checkpoints made through the CLI store the backbone's config, not the module this warns about.
            warnings.filterwarnings("ignore", message="Attribute 'backbone' is an instance of `nn.Module`")
            self.save_hyperparameters()
        num_classes = getattr(backbone, "num_classes", None)
        if not isinstance(num_classes, int):
            raise ConfigError(f"the backbone {type(backbone).__name__} must expose an integer `num_classes`")
        self.backbone = backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)
        self.compiled = compile  # not `self.compile`: that would hide nn.Module.compile()
        if compile:
            self.backbone.compile(mode=None if compile_backend != "inductor" else compile_mode, backend=compile_backend)
        self.train_metrics = _accuracy_metrics(num_classes)
        self.val_metrics = _accuracy_metrics(num_classes)
        self.test_metrics = _accuracy_metrics(num_classes)
        # The epoch mean, reduced over processes once per epoch; its NaN check would sync every step.
        self.train_loss = MeanMetric(nan_strategy="disable")

    def setup(self, stage: str) -> None:
        # An example input lets the model summary count FLOPs and TensorBoard draw the network graph
        # (which torch.jit.trace cannot do through a compiled backbone).
        size = getattr(self.trainer.datamodule, "input_size", None) if self._trainer else None
        if size is not None and not self.compiled:
            self.example_input_array = torch.zeros(2, 3, size, size)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x.contiguous(memory_format=self.memory_format))

    def view_averaged_log_probs(self, images: Tensor | list[list[Tensor]]) -> Tensor:
        """Log of the softmax averaged over every view of each image (the paper's 10-crop and multi-scale tests).

        `images` is a batch [B, C, H, W] (one view each), [B, V, C, H, W] (V views of one size), or one list of
        views per image when the views differ in size; each view runs through the net on its own size.
        """
        if isinstance(images, Tensor) and images.ndim == 4:
            return self(images).log_softmax(dim=1)
        if isinstance(images, Tensor):
            batch, views = images.shape[:2]
            probs = self(images.flatten(0, 1)).softmax(dim=1).view(batch, views, -1).mean(dim=1)
        else:
            probs = torch.stack([torch.cat([self(v[None]).softmax(dim=1) for v in views]).mean(0) for views in images])
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def _shared_step(self, batch: tuple[Tensor | list, Tensor], stage: str) -> Tensor:
        images, labels = batch
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        if stage == "train":
            logits = self(images)
            loss = F.cross_entropy(logits, labels)
            logits = logits.detach()
            self.train_loss.update(loss.detach())
            metrics.update(logits, labels)
            # Per iteration only the loss and the top-1 error (the paper's curves), each one kernel, kept out
            # of the progress bar: it would turn them into Python floats, a device sync, every step.
            self.log("train/loss", loss, on_step=True, on_epoch=False)
            error = 100.0 * (logits.argmax(dim=1) != labels).float().mean()
            self.log("train/err_top1", error, on_step=True, on_epoch=False)
            return loss
        log_probs = self.view_averaged_log_probs(images)
        loss = F.nll_loss(log_probs, labels)
        metrics.update(log_probs, labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(labels))
        return loss

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        suffix = "_epoch" if stage == "train" else ""  # train/err_top1 is the per-iteration value
        # compute() reduces over all processes, so the logged value is already global and the sync a no-op.
        for name, acc in metrics.compute().items():
            for key, value in ((f"acc_{name[4:]}", acc), (f"err_{name[4:]}", 100.0 * (1.0 - acc))):
                self.log(f"{stage}/{key}{suffix}", value, prog_bar=name == "acc_top1", sync_dist=True)
        metrics.reset()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.view_averaged_log_probs(images).exp()

    def on_train_epoch_end(self) -> None:
        self.log("train/loss_epoch", self.train_loss.compute(), sync_dist=True, prog_bar=True)
        self.train_loss.reset()
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_state_dict_matches(self, checkpoint.get("state_dict", {}), "the checkpoint")

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
