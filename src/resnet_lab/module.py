"""`ImageClassifier`: the LightningModule that trains any backbone with cross-entropy and reports top-k error."""

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
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from resnet_lab.checkpoints import (
    HYPERPARAMETER_KEYS,
    check_checkpoint_plain,
    check_plain,
    check_state_dict_matches,
    read_checkpoint,
)
from resnet_lab.errors import ConfigError, DataError
from resnet_lab.graph_step import GraphStep, carry_step_count, check_supported, counting
from resnet_lab.metrics import TrainingMeans, TrainingMetric, default_training_metrics

# Throughout, accuracies are fractions (`acc_*`, as torchmetrics gives them) and errors percentages (`err_*`, as the
# paper's tables and figures state them).
# What `norm_and_bias_weight_decay` counts as normalization (torchvision's `set_weight_decay` takes the same).
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def _accuracy_metrics(num_classes: int) -> MetricCollection:
    # validate_args=False: the checks call torch.unique on the labels, a host-device sync on every update.
    metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)}
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", validate_args=False)
    return MetricCollection(metrics)


class ImageClassifier(L.LightningModule):
    """Image classification with a backbone, an optimizer and a learning-rate schedule.

    Logs `{val,test}/loss`, `.../acc_top1`, `.../acc_top5` and the matching error in percent (`.../err_top1`,
    `.../err_top5`: the paper's tables are in error %), per epoch; they average the softmax over every view the
    data module gives an image (one centre crop, ten crops, or several scales). Training logs each of
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
        train_metrics: the training metrics (`resnet_lab.metrics`); None: the loss and the top-1 accuracy.
        label_smoothing: weight of the uniform distribution in the training loss's target (0.1 in torchvision's
            recipe; 0, the paper, keeps the labels as they are). Validation and test losses are of the true labels.
        norm_and_bias_weight_decay: weight decay of the normalization layers' parameters and of every bias; None
            applies the optimizer's own to all parameters (the paper), 0.0 exempts them (torchvision's recipe).
        graph_step: make each training iteration (forward, loss, backward, the fused SGD update, the next
            learning rate and the training sums) with one function that a GPU records once as a CUDA graph and
            replays (`resnet_lab.graph_step`; configs/presets/gpu_graph.yaml); on a CPU it runs eagerly. It trains
            exactly as the ordinary path, and refuses in one line what it cannot (fp16, data parallelism,
            gradient accumulation or clipping, an optimizer other than fused SGD, a schedule stepped per epoch).
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
        train_metrics: list[TrainingMetric] | None = None,
        label_smoothing: float = 0.0,
        norm_and_bias_weight_decay: float | None = None,
        graph_step: bool = False,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # Checkpoints made through the CLI store the backbone's config, not the module this warns about.
            warnings.filterwarnings("ignore", message="Attribute 'backbone' is an instance of `nn.Module`")
            self.save_hyperparameters()
        if isinstance(self.hparams.get("backbone"), nn.Module):
            # Built in Python rather than from a config: keep plain values only. As a hyperparameter the module would
            # be pickled into every checkpoint beside its own weights and written into hparams.yaml as text by the
            # loggers (minutes for a ResNet-50), and pickled callables stop torch.load(weights_only=True).
            self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "train_metrics"])
        self.backbone = backbone
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
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
        self.graph_step = graph_step
        # The update is made inside the step: Lightning only counts it (resnet_lab.graph_step.CountingOptimizer).
        self.automatic_optimization = not graph_step
        self.graph: GraphStep | None = None  # made when training starts, after any checkpoint is restored

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
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, self.train_means.add(logits, labels, loss)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        loss, means = self.graph(images, labels) if self.graph is not None else self.loss_and_means(images, labels)
        self.train_means.count(len(labels))
        # Here rather than after the step, so that a checkpoint written after this iteration holds the window
        # already taken. Only the micro-batch that completes an optimizer step logs: the window then holds every
        # micro-batch of its steps.
        if self._completes_optimizer_step(batch_idx) and self._loggers_write_after_this_step():
            window = self.train_means.named(self.train_means.take(0), "train/")
            # Not prog_bar=True: Lightning reads every progress-bar value back to the host after every iteration, a
            # sync each on a GPU. The bar reads these itself when it redraws (callbacks.ThrottledProgressBar).
            self.log_dict(window, on_step=True, on_epoch=False)
        if self.graph is not None:
            self.optimizers().step()  # counts the iteration: the update is already made
        # Callbacks read the iteration's own values from these outputs (e.g. the warm-up switch, the NaN stop).
        return {**self.train_means.named(means), "loss": loss}

    def _completes_optimizer_step(self, batch_idx: int) -> bool:
        done, trainer = batch_idx + 1, self.trainer
        return done % trainer.accumulate_grad_batches == 0 or done == trainer.num_training_batches

    def _loggers_write_after_this_step(self) -> bool:
        # Lightning writes step values after the optimizer steps where this holds, and after the last one.
        trainer = self.trainer
        step = self.global_step + 1
        return step % trainer.log_every_n_steps == 0 or step == trainer.max_steps or bool(trainer.fast_dev_run)

    def _eval_step(self, batch: tuple[Tensor | list, Tensor], stage: str) -> None:
        images, labels = batch
        log_probs = self.view_averaged_log_probs(images)
        name = f"{stage}_metrics"
        if getattr(self, name) is None:
            setattr(self, name, _accuracy_metrics(log_probs.shape[1]).to(log_probs.device))
        getattr(self, name).update(log_probs, labels)
        loss = F.nll_loss(log_probs, labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(labels))

    def _log_epoch_metrics(self, stage: str) -> None:
        metrics: MetricCollection | None = getattr(self, f"{stage}_metrics")
        if metrics is None:  # no batch at all (an empty split)
            return
        # compute() reduces over all processes, so the logged value is already global and the sync a no-op.
        accuracies = metrics.compute()
        metrics.reset()
        self.log(f"{stage}/err_top1", 100.0 * (1.0 - accuracies["top1"]), prog_bar=True, sync_dist=True)
        logged = {f"{stage}/acc_{k}": v for k, v in accuracies.items()}
        logged |= {f"{stage}/err_{k}": 100.0 * (1.0 - v) for k, v in accuracies.items() if k != "top1"}
        self.log_dict(logged, sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.view_averaged_log_probs(images).exp()

    def on_fit_start(self) -> None:
        # After the callbacks' on_fit_start, so a warm-up switch among them has attached itself.
        for config in self.trainer.lr_scheduler_configs:
            check = getattr(config.scheduler, "check_warmup_ends", None)
            if check is not None:
                check()
        if self.graph_step:
            check_supported(self.trainer, self)

    def on_train_start(self) -> None:
        if self.graph_step:
            optimizer = self.trainer.optimizers[0].optimizer
            configs = self.trainer.lr_scheduler_configs
            schedule = configs[0].scheduler if configs else None
            total = int(self.trainer.estimated_stepping_batches)
            self.graph = GraphStep(self.loss_and_means, optimizer, schedule, self.global_step, total)

    def on_train_end(self) -> None:
        if self.graph is not None:
            self.graph.finish()

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
        if self.graph is not None and "optimizer_states" in checkpoint:
            # The scheduler and the learning rates as the ordinary path saves them (it steps the scheduler every
            # iteration; the graph reads its learning rates from a table): either path resumes the other's run.
            schedulers, lrs = self.graph.scheduler_state()
            checkpoint["lr_schedulers"] = schedulers
            for group, lr in zip(checkpoint["optimizer_states"][0]["param_groups"], lrs, strict=True):
                group["lr"] = lr

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_state_dict_matches(self, checkpoint.get("state_dict", {}), "the checkpoint")
        carry_step_count(checkpoint, self.graph_step)
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
        if self.graph_step:
            optimizer = counting(optimizer)
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
        if self.graph_step:  # no schedule on a metric under manual optimization (refused): Lightning warns of the key
            del scheduler["monitor"]
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
