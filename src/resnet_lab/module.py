"""`ImageClassifier`: the LightningModule that trains any backbone with a loss (cross-entropy) and reports top-k
error."""

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.saving import load_hparams_from_tags_csv, load_hparams_from_yaml
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from resnet_lab.checkpoints import (
    HYPERPARAMETER_KEYS,
    carry_step_count,
    check_checkpoint_plain,
    check_plain,
    check_state_dict_matches,
    read_checkpoint,
)
from resnet_lab.errors import ConfigError, DataError
from resnet_lab.metrics import TrainingMeans, TrainingMetric, default_training_metrics

# Throughout, accuracies are fractions (`acc_*`, as torchmetrics gives them) and errors percentages (`err_*`, as the
# paper's tables and figures state them).
# What `norm_and_bias_weight_decay` counts as normalization (torchvision's `set_weight_decay` takes the same).
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def accuracy_metrics(num_classes: int) -> dict[str, Metric]:
    """The paper's evaluation metrics: top-1 and (with 5 classes or more) top-5 accuracy."""
    # validate_args=False: the checks call torch.unique on the labels, a host-device sync on every update.
    metrics = {"acc_top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)}
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", validate_args=False)
    return metrics


# The graph step's new spelling, for the old `graph_step: true` (the command line refuses it, as a user's setting).
GRAPH_STEP_MOVED = (
    "the graph step is a module class of its own now, --model resnet_lab.graph_step.GraphStepClassifier "
    "(configs/presets/gpu_graph.yaml)"
)


class ImageClassifier(L.LightningModule):
    """Image classification with a backbone, an optimizer and a learning-rate schedule.

    Logs `{val,test}/loss` (the negative log-likelihood of the true labels), `.../acc_top1`, `.../acc_top5` and the
    matching error in percent (`.../err_top1`, `.../err_top5`: the paper's tables are in error %), and each of
    `metrics`, per epoch; they average the softmax over every view the data module gives an image (one centre crop,
    ten crops, or several scales). Training logs each of
    `train_metrics` (by default `train/loss`, `train/acc_top1` and `train/err_top1`) against the iteration (the
    paper's curves), each the mean over the images of the `log_every_n_steps` optimizer steps since the last point
    (every micro-batch of an accumulated step included), and the same over the epoch as `train/<name>_epoch`.

    Checkpoints of a model built from a config (the CLI) rebuild it with `ImageClassifier.load_from_checkpoint(path)`.
    Built in Python, only the plain arguments are hyperparameters: pass the backbone again,
    `load_from_checkpoint(path, backbone=CifarResNet(20))` (and the optimizer and schedule, to train on).

    Args:
        backbone: any network mapping images to logits (`CifarResNet`, `torchvision.models.resnet18`, ...).
        optimizer: builds the optimizer from the parameters, e.g. SGD with lr 0.1, momentum 0.9, wd 1e-4.
        lr_scheduler: builds the schedule from the optimizer; None keeps the learning rate constant.
        scheduler_interval: "step" advances the schedule every iteration (the paper's CIFAR milestones are
            iterations), "epoch" once per epoch.
        scheduler_monitor: metric a `ReduceLROnPlateau` schedule watches.
        channels_last: keep weights and inputs in NHWC memory format (faster convolutions on GPUs with tensor
            cores, and on CPUs).
        compile: compile the backbone with `torch.compile` for training (in place: checkpoints keep their keys).
            Validation, test and predict run it eagerly: their batch and image sizes vary (a short last batch,
            ten crops, several scales), and every new size would cost a recompile longer than the evaluation.
        compile_mode: `torch.compile` mode, e.g. "max-autotune" or "reduce-overhead" (CUDA graphs).
        compile_backend: `torch.compile` backend: "inductor" generates kernels; "aot_eager" checks that the
            graph captures without generating any (quick, for debugging).
        loss: the training loss, a module called with the logits [B, classes] and the labels ([B] class indices, or
            [B, classes] probabilities when a batch is mixed); None: cross-entropy with `label_smoothing`.
        metrics: evaluation metrics besides the top-1 and top-5 accuracy, by the name they are logged under
            (`val/<name>`, `test/<name>`), e.g. `{"ece": MulticlassCalibrationError(10)}`; each is updated with the
            view-averaged log-probabilities [B, classes] and the labels, and computed once per epoch. A name that
            starts with `acc_` is an accuracy and is also logged as its error in percent (`err_...`); giving
            `acc_top1` or `acc_top5` replaces that accuracy.
        train_metrics: the training metrics (`resnet_lab.metrics`); None: the loss and the top-1 accuracy.
        label_smoothing: weight of the uniform distribution in the default loss's target (0.1 in torchvision's
            recipe; 0, the paper, keeps the labels as they are). Validation and test losses are of the true labels.
        norm_and_bias_weight_decay: weight decay of the normalization layers' parameters and of every bias; None
            applies the optimizer's own to all parameters (the paper), 0.0 exempts them (torchvision's recipe).
        graph_step: kept so that checkpoints written before the graph step was a module class of its own load
            (True is ignored, with a warning); the graph step is `--model resnet_lab.graph_step.GraphStepClassifier`
            (configs/presets/gpu_graph.yaml).
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
        loss: nn.Module | None = None,
        metrics: dict[str, Metric] | None = None,
        train_metrics: list[TrainingMetric] | None = None,
        label_smoothing: float = 0.0,
        norm_and_bias_weight_decay: float | None = None,
        graph_step: bool = False,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # Checkpoints made through the CLI store the backbone's config, not the module this warns about.
            warnings.filterwarnings("ignore", message="Attribute '(backbone|loss)' is an instance of `nn.Module`")
            self.save_hyperparameters()
        if isinstance(self.hparams.get("backbone"), nn.Module):
            # Built in Python rather than from a config: keep plain values only. As a hyperparameter the module would
            # be pickled into every checkpoint beside its own weights and written into hparams.yaml as text by the
            # loggers (minutes for a ResNet-50), and pickled callables stop torch.load(weights_only=True).
            self.save_hyperparameters(
                ignore=["backbone", "optimizer", "lr_scheduler", "loss", "metrics", "train_metrics"]
            )
        self.backbone = backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if loss is not None and label_smoothing:
            raise ConfigError(
                f"label_smoothing {label_smoothing} is an argument of the default loss, and a loss is given: give it "
                "to that loss (e.g. --model.loss.init_args.label_smoothing), or leave --model.loss out"
            )
        self.label_smoothing = label_smoothing
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing) if loss is None else loss
        # Not registered as modules: each stage evaluates a copy of its own (and a Metric's state is not saved).
        self.metrics = dict(metrics or {})
        self.norm_and_bias_weight_decay = norm_and_bias_weight_decay
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)
        self.compiled = compile  # not `self.compile`: that would hide nn.Module.compile()
        if compile:
            self.backbone.compile(mode=None if compile_backend != "inductor" else compile_mode, backend=compile_backend)
        # Built at the first evaluation batch, from the logits' width: any backbone will do, whether or not it
        # says how many classes it has.
        self.val_metrics: MetricCollection | None = None
        self.test_metrics: MetricCollection | None = None
        # Summed on the device and read only when the loggers write: no host-device sync and no `self.log` call
        # per iteration (each costs more host time than a small CIFAR step on a GPU; docs/benchmarks.md).
        self.train_means = TrainingMeans(train_metrics or default_training_metrics())
        if graph_step:  # a checkpoint of the old gpu_graph preset: its weights evaluate and train the same
            warnings.warn(f"graph_step=True is ignored: {GRAPH_STEP_MOVED}", stacklevel=2)

    def setup(self, stage: str) -> None:
        # An example input lets the model summary count FLOPs and TensorBoard draw the network graph
        # (which torch.jit.trace cannot do through a compiled backbone).
        size = getattr(self.trainer.datamodule, "input_size", None) if self._trainer else None
        if size is not None and not self.compiled:
            # In the precision's input type (64-true, bf16-true, ...), as Lightning converts every batch.
            self.example_input_array = self.trainer.precision_plugin.convert_input(torch.zeros(2, 3, size, size))

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x.contiguous(memory_format=self.memory_format))

    @torch.compiler.set_stance("force_eager")
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

    def loss_and_means(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The training loss of a batch, and the means of its training metrics, which are added to the running sums
        on the device (the image count is the caller's: `train_means.count`)."""
        logits = self(images)
        loss = self.loss(logits, labels)
        return loss, self.train_means.add(logits, labels, loss)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        loss, means = self.training_iteration(images, labels)
        self.train_means.count(len(labels))
        # Here rather than after the step, so that a checkpoint written after this iteration holds the window
        # already taken. Only the micro-batch that completes an optimizer step logs: the window then holds every
        # micro-batch of its steps.
        if self._completes_optimizer_step(batch_idx) and self._loggers_write_after_this_step():
            window = self.train_means.named(self.train_means.take(0), "train/")
            # Not prog_bar=True: Lightning reads every progress-bar value back to the host after every iteration, a
            # sync each on a GPU. The bar reads these itself when it redraws (callbacks.ThrottledProgressBar).
            self.log_dict(window, on_step=True, on_epoch=False)
        # Callbacks read the iteration's own values from these outputs (e.g. the warm-up switch, the NaN stop).
        return {**self.train_means.named(means), "loss": loss}

    def training_iteration(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """What `training_step` makes of a batch: `loss_and_means`, whose loss Lightning then backpropagates and
        steps the optimizer on (`resnet_lab.graph_step.GraphStepClassifier` makes the update itself)."""
        return self.loss_and_means(images, labels)

    def _completes_optimizer_step(self, batch_idx: int) -> bool:
        done, trainer = batch_idx + 1, self.trainer
        return done % trainer.accumulate_grad_batches == 0 or done == trainer.num_training_batches

    def _loggers_write_after_this_step(self) -> bool:
        # Lightning writes step values after the optimizer steps where this holds, and after the last one.
        trainer = self.trainer
        step = self.global_step + 1
        return step % trainer.log_every_n_steps == 0 or step == trainer.max_steps or bool(trainer.fast_dev_run)

    def _eval_step(self, batch: tuple[Tensor | list, Tensor], stage: str) -> dict[str, Tensor]:
        images, labels = batch
        log_probs = self.view_averaged_log_probs(images)
        name = f"{stage}_metrics"
        if getattr(self, name) is None:
            metrics = accuracy_metrics(log_probs.shape[1]) | copy.deepcopy(self.metrics)
            setattr(self, name, MetricCollection(metrics).to(log_probs.device))
        getattr(self, name).update(log_probs, labels)
        loss = F.nll_loss(log_probs, labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(labels))
        # For a callback's on_{validation,test}_batch_end: what the network made of the batch, without running it again.
        return {"loss": loss, "log_probs": log_probs}

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics: MetricCollection | None = getattr(self, f"{stage}_metrics")
        if metrics is None:  # no batch at all (an empty split)
            return
        # compute() reduces over all processes, so the logged value is already global and the sync a no-op.
        values = metrics.compute()
        metrics.reset()
        self.log(f"{stage}/err_top1", 100.0 * (1.0 - values["acc_top1"]), prog_bar=True, sync_dist=True)
        logged = {f"{stage}/{k}": v for k, v in values.items()}
        errors = {k.removeprefix("acc_"): v for k, v in values.items() if k.startswith("acc_") and k != "acc_top1"}
        logged |= {f"{stage}/err_{k}": 100.0 * (1.0 - v) for k, v in errors.items()}
        self.log_dict(logged, sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.view_averaged_log_probs(images).exp()

    def on_fit_start(self) -> None:
        # After the callbacks' on_fit_start, so a warm-up switch among them has attached itself.
        for config in self.trainer.lr_scheduler_configs:
            check = getattr(config.scheduler, "check_warmup_ends", None)
            if check is not None:
                check()
        self.check_trainer(self.trainer)

    def check_trainer(self, trainer: L.Trainer) -> None:
        """Refuse, in one line (`ConfigError`), a trainer this module cannot train with as configured. The command
        line calls it as soon as the trainer is made, before any data-parallel process starts; fit calls it again
        when it starts. Nothing to refuse here: a subclass that cannot train every way says so."""

    def on_train_epoch_end(self) -> None:
        # Every process trains on as many images, so the mean over processes is the global mean.
        epoch = self.train_means.named(self.train_means.take(1), "train/", "_epoch")
        self.log("train/loss_epoch", epoch.pop("train/loss_epoch"), sync_dist=True, prog_bar=True)
        self.log_dict(epoch, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A run resumed mid-epoch logs the same window and epoch means as one never stopped.
        checkpoint["train_means"] = self.train_means.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_state_dict_matches(self, checkpoint.get("state_dict", {}), "the checkpoint")
        carry_step_count(checkpoint, manual=not self.automatic_optimization)
        if "train_means" in checkpoint:
            self.train_means.load_state_dict(checkpoint["train_means"])

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        trusted_modules: Sequence[str] = (),
        **kwargs: Any,
    ) -> "ImageClassifier":
        """Lightning's, for a checkpoint that is data (docs/security.md): a local file, read without unpickling,
        whose saved hyper-parameters (and `hparams_file`) name only allowed classes (`check_plain`). What you pass
        as `kwargs` (e.g. `backbone=CifarResNet(20)`) is your own code and is not checked; `trusted_modules` names
        your own packages whose classes the checkpoint may name too (a fork's: `trusted_modules=["myfork"]`)."""
        if not isinstance(checkpoint_path, str | Path) or "://" in str(checkpoint_path):
            raise ConfigError(
                f"{checkpoint_path!r}: give a checkpoint file's local path (a URL or a stream is not read: Lightning "
                "unpickles remote checkpoints); download it first"
            )
        checkpoint = read_checkpoint(checkpoint_path)
        for name in HYPERPARAMETER_KEYS:  # what `kwargs` replaces is not read
            if isinstance(checkpoint.get(name), dict):
                checkpoint[name] = {k: v for k, v in checkpoint[name].items() if k not in kwargs}
        check_checkpoint_plain(checkpoint, str(checkpoint_path), trusted_modules)
        if hparams_file is not None:  # read as Lightning reads it, which then builds what it names
            try:
                read = (
                    load_hparams_from_tags_csv if str(hparams_file).lower().endswith(".csv") else load_hparams_from_yaml
                )
                hparams = read(str(hparams_file))
            except Exception as err:  # noqa: BLE001 - a file from elsewhere: whatever is wrong with it, one line
                raise DataError(f"hparams_file {hparams_file} is not readable ({type(err).__name__}: {err})") from err
            check_plain(
                {k: v for k, v in (hparams or {}).items() if k not in kwargs}, str(hparams_file), "", trusted_modules
            )
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only=True, **kwargs
        )

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one, or with `norm_and_bias_weight_decay` set, the normalization
        layers' parameters and every bias in a second group with that weight decay."""
        if self.norm_and_bias_weight_decay is None:
            return [{"params": list(self.parameters())}]
        exempt = {
            id(p)
            for module in self.modules()
            for name, p in module.named_parameters(recurse=False)
            if isinstance(module, NORM_LAYERS) or name == "bias"
        }
        decayed = [p for p in self.parameters() if id(p) not in exempt]
        exempted = [p for p in self.parameters() if id(p) in exempt]
        return [{"params": decayed}, {"params": exempted, "weight_decay": self.norm_and_bias_weight_decay}]

    def build_optimizer(self, parameters: list) -> torch.optim.Optimizer:
        """`optimizer` over `parameters`, its own argument checks made one-line errors."""
        try:
            return self.optimizer(parameters)
        except (ValueError, RuntimeError) as err:  # "Invalid learning rate: -0.1", "fused and foreach cannot be..."
            raise ConfigError(f"the optimizer cannot be built: {err}; check --model.optimizer.init_args") from err

    def configure_optimizers(self):  # noqa: ANN201 - Lightning accepts several return shapes
        optimizer = self.build_optimizer(self.parameter_groups())
        if self.lr_scheduler is None:
            return optimizer
        schedule = self.lr_scheduler(optimizer)
        if getattr(schedule, "total_steps", 0) is None:  # a schedule whose length is the run's (WarmupCosineLR)
            schedule.set_total_steps(int(self.trainer.estimated_stepping_batches))
        scheduler = {
            "scheduler": schedule,
            "interval": self.scheduler_interval,
            "monitor": self.scheduler_monitor,
        }
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
