"""The Trainer the command line builds (`trainer:` in a config): Lightning's, with the callbacks every run has,
atomic checkpoints, and its settings checked before anything runs, each refusal one line."""

import logging
import os
import warnings

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback
from lightning.pytorch import Trainer as LightningTrainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.plugins import TorchCheckpointIO

from resnet_lab.callbacks import (
    CheckpointOnSignal,
    PeriodicCheckpoint,
    RunCheckpoint,
    SpeedMonitor,
    StopOnNonFiniteLoss,
    ThrottledProgressBar,
    ValidateAtMaxSteps,
)
from resnet_lab.checkpoints import AtomicCheckpointIO
from resnet_lab.errors import ConfigError
from resnet_lab.notebook import TensorBoardNotebook

# Lightning 2.6 on torch >= 2.10 warns from its own internals on every fit; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
# TensorBoard draws the network graph with torch.jit.trace, which torch >= 2.9 calls deprecated.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated", category=FutureWarning)
# Lightning counts the logging interval in iterations across epochs, so short epochs (a scaled run's) still log every
# log_every_n_steps iterations, as this warning would have one believe they do not.
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")


class _NoAdvertisements(logging.Filter):
    """Lightning 2.6 suggests its cloud products on every command ("Tip: ... litlogger")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertisements())

# Every run's callbacks. Those the command line configures, `--<name>.<argument>` (LightningCLI's
# `add_lightning_class_args`), with their defaults here: the best checkpoint on validation; the latest state at every
# validation (Lightning's own `save_last` follows the best checkpoint, so a run whose validation error stops
# improving would keep an old `last.ckpt`); `last.ckpt` every N iterations as well, which bounds what a kill loses
# (`--periodic_checkpoint.every_n_train_steps N`); the learning rate at every iteration; TensorBoard's figures and
# layouts (`--notebook.enabled false` turns them off).
CONFIGURED_CALLBACKS = {
    "checkpoint": (RunCheckpoint, {"monitor": "val/err_top1", "mode": "min", "filename": "best-step{step}",
                                   "auto_insert_metric_name": False}),
    "last_checkpoint": (RunCheckpoint, {"filename": ModelCheckpoint.CHECKPOINT_NAME_LAST, "monitor": None,
                                        "save_top_k": 1, "enable_version_counter": False}),
    "periodic_checkpoint": (PeriodicCheckpoint, {}),
    "lr_monitor": (LearningRateMonitor, {"logging_interval": "step"}),
    "notebook": (TensorBoardNotebook, {}),
}  # fmt: skip
# And those the Trainer adds itself: a validation at the last step, speed logging, a stop at a non-finite loss, a
# checkpoint and a clean exit on SIGTERM/SIGUSR1. One given in `callbacks` takes its kind's place.
DEFAULT_CALLBACKS = (ValidateAtMaxSteps, SpeedMonitor, StopOnNonFiniteLoss, CheckpointOnSignal)
# Words of a Lightning refusal that is about this machine rather than a setting's value.
MACHINE_WORDS = ("accelerator", "gpu", "cuda", "mps", "tpu", "backend", "install", "strategy", "device", "precision")


def validation_epochs(val_check_interval: object, check_val_every_n_epoch: int | None) -> int | None:
    """`check_val_every_n_epoch` as the Trainer runs it: None where `val_check_interval` is a number of iterations and
    it was left at 1. An iteration count means every N iterations of the run, as in the paper's protocol, also across
    epochs and beyond one; Lightning counts it within each epoch unless check_val_every_n_epoch is None."""
    iterations = isinstance(val_check_interval, int) and not isinstance(val_check_interval, bool)
    return None if iterations and check_val_every_n_epoch == 1 else check_val_every_n_epoch


class Trainer(LightningTrainer):
    """Lightning's Trainer with `DEFAULT_CALLBACKS`, a progress bar redrawn a few times a second
    (`ThrottledProgressBar`) unless another is given or bars are off, checkpoints written atomically
    (`AtomicCheckpointIO`) unless a plugin chooses how, and its settings refused in one line where they cannot run
    here or would run other than written.

    An integer `val_check_interval` counts iterations across epochs (`validation_epochs`: check_val_every_n_epoch 1
    becomes None). The batch limits are typed `int | float`, whole numbers first: `limit_val_batches: 1` is one
    batch, as Lightning documents, where its own `float | int` has the parser read the 1 as 1.0, all of them.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        callbacks: list[Callback] | Callback | None = None,
        **kwargs,
    ) -> None:
        interval = kwargs.get("val_check_interval")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval <= 0:
            raise ConfigError(
                f"--trainer.val_check_interval {interval}: give a number of iterations (e.g. 2000) or a fraction of an "
                "epoch in (0, 1]"
            )
        kwargs["check_val_every_n_epoch"] = validation_epochs(interval, kwargs.get("check_val_every_n_epoch", 1))
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
        callbacks += [kind() for kind in DEFAULT_CALLBACKS if not any(isinstance(c, kind) for c in callbacks)]
        if kwargs.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(ThrottledProgressBar())
        try:
            super().__init__(
                limit_train_batches=limit_train_batches,
                limit_val_batches=limit_val_batches,
                limit_test_batches=limit_test_batches,
                limit_predict_batches=limit_predict_batches,
                callbacks=callbacks,
                **kwargs,
            )
        except MisconfigurationException as err:  # e.g. no GPU, a strategy whose package is not installed
            if not any(word in str(err).lower() for word in MACHINE_WORDS):
                raise ConfigError(f"the trainer refuses its settings: {err}") from err
            raise ConfigError(
                f"the trainer cannot run as configured on this machine: {err} Check --trainer.accelerator, "
                "--trainer.devices, --trainer.strategy and --trainer.precision "
                "(without a GPU: --trainer.accelerator cpu)"
            ) from err
        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:  # not a plugin the config chose
            self.strategy.checkpoint_io = AtomicCheckpointIO()
        on_cpu = self.strategy.root_device.type == "cpu"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if on_cpu and self.num_devices > cores:
            raise ConfigError(
                f"--trainer.devices {self.num_devices} starts {self.num_devices} training processes on the CPU, "
                f"which has {cores} cores: each would crawl. Use --trainer.devices {cores} or fewer (a CPU device is "
                "a process, not a core: one process already uses every core)"
            )
        if kwargs.get("sync_batchnorm") and self.world_size > 1 and on_cpu:
            # Otherwise every process stops with torch's traceback when DDP wraps the model.
            raise ConfigError(
                "--trainer.sync_batchnorm true needs GPUs: PyTorch's SyncBatchNorm does not run on CPU. "
                "Turn it off (--trainer.sync_batchnorm false) to train data-parallel on CPU"
            )
