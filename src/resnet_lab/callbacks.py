"""Callbacks of the paper's training protocol and of the run logs."""

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from resnet_lab.errors import ConfigError, UserError
from resnet_lab.records import cpu_has_bf16


def last_checkpoint_path(trainer: Trainer) -> Path:
    """`<run>/checkpoints/last.ckpt`: where the run's latest state is kept."""
    folders = [c.dirpath for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    folder = Path(folders[0]) if folders else Path(trainer.default_root_dir) / "checkpoints"
    return folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


def parameters_are_finite(module: LightningModule) -> bool:
    """Whether every weight is finite (one host sync)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in module.parameters()]).all())


class ValidateAtMaxSteps(Callback):
    """Validate (and so checkpoint) the final model when `max_steps` ends training in the middle of an epoch.

    The paper's schedules are in iterations: 64k iterations of CIFAR are 182.3 epochs, and without this the last
    0.3 epoch would never be validated. Lightning validates when a stop is requested, so request it on the last step.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.max_steps == 0:  # Lightning would "train" and save the untrained network
            raise ConfigError(
                "--trainer.max_steps 0 trains nothing: give a number of iterations, or -1 with --trainer.max_epochs "
                "for a budget in epochs"
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class WarmupUntilTrainError(Callback):
    """End the warm-up of a `WarmupMultiStepLR` once the running training error falls below `threshold` percent.

    The paper's ResNet-110 and 1202 "use 0.01 to warm up the training until the training error is below 80% (about
    400 iterations), and then go back to 0.1" (Sec. 4.2). The running error is the mean top-1 error of the last
    `window` iterations, of the global batch under data parallelism. The iteration of the switch is logged as
    `train/warmup_end_step`.

    Args:
        threshold: training top-1 error in percent below which the warm-up ends.
        window: iterations in the running error.
    """

    def __init__(self, threshold: float = 80.0, window: int = 20) -> None:
        self.threshold = threshold
        self.window = window
        self.errors: list[float] = []

    def _scheduler(self, trainer: Trainer):  # noqa: ANN202 - any scheduler with end_warmup()
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "end_warmup"):
                return config.scheduler
        raise ConfigError(
            "WarmupUntilTrainError needs a scheduler with end_warmup(), e.g. resnet_lab.schedules.WarmupMultiStepLR "
            "with warmup_steps: null"
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._scheduler(trainer).warmup_driver = type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        # A run resumed during the warm-up goes on with the same running error.
        return {"errors": list(self.errors)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.errors = list(state_dict.get("errors", []))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        scheduler = self._scheduler(trainer)
        if scheduler.warmup_end is not None:
            return
        # One host sync per iteration, only while warming up (a few hundred iterations). Under data parallelism
        # the error is the global batch's, so that every process ends the warm-up at the same iteration.
        error = trainer.strategy.reduce(outputs["err_top1"].float(), reduce_op="mean")
        self.errors = [*self.errors[-(self.window - 1) :], float(error)]
        running = sum(self.errors) / len(self.errors)
        if len(self.errors) == self.window and running < self.threshold:
            scheduler.end_warmup()
            step = trainer.global_step
            pl_module.log("train/warmup_end_step", float(step), on_step=True, on_epoch=False)
            rank_zero_info(
                f"warm-up ended at iteration {step}: running training error {running:.1f}% < {self.threshold}%"
            )


class SpeedMonitor(Callback):
    """Log training images per second (`perf/images_per_s`), epoch time (`perf/epoch_time_s`) and, on a GPU, the
    peak memory allocated (`perf/peak_memory_gb`).

    Rates are wall time over `trainer.log_every_n_steps` iterations, so they need no per-step device sync.
    """

    def __init__(self) -> None:
        self.images = 0
        self.window_start = 0.0
        self.epoch_start: float | None = None  # None: this epoch began before a resume, so its time is unknown
        self.started = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started = False
        if pl_module.device.type == "cpu" and "bf16" in str(trainer.precision) and cpu_has_bf16() is False:
            rank_zero_warn(
                f"--trainer.precision {trainer.precision} on a CPU without bfloat16 instructions (no avx512_bf16 or "
                "amx_bf16 in /proc/cpuinfo): torch emulates them, many times slower than 32-true; leave out "
                "configs/presets/bf16.yaml here"
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch_start = self.window_start = time.perf_counter()
        self.images, self.started = 0, True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Lightning calls no on_train_epoch_start when a run resumes in the middle of an epoch.
        if not self.started:
            self.window_start, self.images, self.epoch_start, self.started = time.perf_counter(), 0, None, True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.images += len(batch[1])
        if trainer.global_step % trainer.log_every_n_steps == 0:
            now = time.perf_counter()
            rate = self.images * trainer.world_size / max(now - self.window_start, 1e-9)
            pl_module.log("perf/images_per_s", rate, on_step=True, on_epoch=False)
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
                pl_module.log("perf/peak_memory_gb", peak, on_step=True, on_epoch=False)
            self.window_start, self.images = now, 0

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A validation inside an epoch is not training time: start a new window after it.
        self.window_start, self.images = time.perf_counter(), 0

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.epoch_start is not None:  # an epoch resumed half-way is not timed
            elapsed = time.perf_counter() - self.epoch_start
            pl_module.log("perf/epoch_time_s", elapsed, on_step=False, on_epoch=True, sync_dist=True)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(Callback):
    """Stop with a clear message when the training loss or the weights stop being finite, before any checkpoint of
    them is written.

    The first bad iteration is recorded on the device every iteration and read every `trainer.log_every_n_steps`
    iterations (when the loggers read values anyway); before every validation and at every epoch end, when
    checkpoints are written, the weights are checked too. No iteration waits for a check.
    """

    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        step = trainer.global_step - 1  # the iteration that produced this loss
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._check(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":  # a validation inside fit ends with checkpoints
            self._check(trainer, pl_module, weights=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer, pl_module, weights=True)  # ModelCheckpoint runs after every other callback

    def _check(self, trainer: Trainer, pl_module: LightningModule | None = None, weights: bool = False) -> None:
        what = None
        if self.first_bad is not None and int(self.first_bad) >= 0:
            what = f"the training loss is not finite since iteration {int(self.first_bad)}"
        # The update after the last finite loss can overflow the weights before any loss shows it.
        elif weights and pl_module is not None and not parameters_are_finite(pl_module):
            what = f"the weights are not finite after iteration {trainer.global_step - 1}"
        if what is None:
            return
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else float("nan")
        last = last_checkpoint_path(trainer)
        last = last if last.is_file() else "none written yet"
        raise NonFiniteLossError(
            f"{what} (learning rate {lr:g}); stopped before writing a checkpoint of it. Last good checkpoint: "
            f"{last}. Lower the learning rate, add warm-up, or check the data for NaNs."
        )


class CheckpointOnSignal(Callback):
    """On SIGTERM or SIGUSR1 (a scheduler's notice before it kills a job), finish the current iteration, write
    `last.ckpt` beside the run's other checkpoints, and exit with status 0: `--ckpt_path last` resumes from there
    exactly. No validation runs on the way out (it could outlast the scheduler's grace period).

    Under SLURM, Lightning keeps SIGUSR1 for its auto-requeue (`#SBATCH --signal=SIGUSR1@90`): it requeues the
    job, and the SIGTERM that follows brings the run here. Processes of a data-parallel run agree every
    `check_every` iterations (one small collective), so they stop at the same iteration.

    Args:
        check_every: iterations between the processes' agreement under data parallelism.
    """

    def __init__(self, check_every: int = 10) -> None:
        self.check_every = check_every
        self.signalled: int | None = None
        self.saved = False
        self.previous_handler: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.signalled, self.saved = None, False
        # Handlers can only be set from the main thread (not, e.g., when a notebook trains in a thread).
        if stage == "fit" and not SLURMEnvironment.detect() and threading.current_thread() is threading.main_thread():
            self.previous_handler = signal.signal(signal.SIGUSR1, self._note)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.previous_handler is not None:
            signal.signal(signal.SIGUSR1, self.previous_handler)
            self.previous_handler = None

    def _note(self, signum: int, frame: object) -> None:
        self.signalled = signum  # only note it: the iteration in progress must finish first

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self.signalled is not None or trainer.received_sigterm
        if trainer.world_size > 1:
            if trainer.global_step % self.check_every:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._save(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Stopping here rather than right after the save lets Lightning log the saved iteration's values first.
        if self.saved:
            raise SIGTERMException  # Lightning's clean exit: loggers flushed, status 0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.saved and trainer.state.fn == "fit":  # no validation on the way out
            raise SIGTERMException

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning ends a data-parallel run on SIGTERM at the start of the next iteration, on every process.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and not self.saved:
            self._save(trainer)

    def _save(self, trainer: Trainer) -> None:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the whole state, to resume
        name = signal.Signals(self.signalled).name if self.signalled else "SIGTERM"
        rank_zero_info(
            f"{name}: saved {path} after iteration {trainer.global_step}; resume with --ckpt_path last (or {path})"
        )
        self.saved = True


class PeriodicCheckpoint(Callback):
    """Also write `last.ckpt` every `every_n_train_steps` iterations, to bound what a crash or `kill -9` loses
    (`last.ckpt` is written at every validation anyway). Weights that are no longer finite are not written: the
    last good `last.ckpt` stays, and `StopOnNonFiniteLoss` ends the run.

    Args:
        every_n_train_steps: iterations between writes; None writes only at validations.
    """

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ConfigError(f"every_n_train_steps must be at least 1 (or null), got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.every_n_train_steps or trainer.global_step % self.every_n_train_steps:
            return
        if parameters_are_finite(pl_module):
            trainer.save_checkpoint(last_checkpoint_path(trainer), weights_only=False)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose state read from a checkpoint keeps only the files in this run's checkpoint
    folder: Lightning deletes, recursively and wherever they are, the previous best and last files that a resumed
    state names, so a doctored `best_model_path` (`local:///home`, `checkpoints/../..`) would delete a folder."""

    @property
    def state_key(self) -> str:
        # Lightning's key names the class: keep ModelCheckpoint's, so that every checkpoint written before resumes.
        return f"ModelCheckpoint{super().state_key.removeprefix(type(self).__qualname__)}"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        folder = os.path.realpath(self.dirpath) if self.dirpath else None

        def inside(path: object) -> bool:
            return (
                bool(folder)
                and isinstance(path, str)
                and "://" not in path
                and os.path.dirname(os.path.realpath(path)) == folder
                and not os.path.isdir(path)  # Lightning would delete a folder recursively
            )

        paths = ("best_model_path", "kth_best_model_path", "last_model_path")
        named = [state_dict.get(key) for key in paths if state_dict.get(key)]
        named += list(state_dict.get("best_k_models", {}))
        outside = [path for path in named if not inside(path)]
        if outside:
            saved = state_dict.get("dirpath")
            if isinstance(saved, str) and os.path.realpath(saved) == folder:  # a moved run's: Lightning warns
                rank_zero_warn(
                    f"the checkpoint's {self.state_key.partition('{')[0]} state names files outside {self.dirpath} "
                    f"({outside[0]!r}): its record of best and last checkpoints is ignored"
                )
            state_dict = {**state_dict, "best_k_models": {}, "kth_best_model_path": "", "last_model_path": ""}
            state_dict["best_model_path"] = ""
        super().load_state_dict(state_dict)


class ThrottledProgressBar(TQDMProgressBar):
    """Lightning's progress bar, redrawn at most every `interval_s` seconds while training, and always before a
    validation and at the end of an epoch.

    The stock bar redraws after every iteration, a sizeable share of what Lightning's loop itself costs per
    iteration and of a compiled ResNet-20 iteration on a GPU (measured in docs/benchmarks.md). A `refresh_rate`
    counted in iterations would instead leave a slow run's bar (ImageNet on a CPU) unchanged for minutes.

    Args:
        interval_s: the least time between two redraws of the training bar.
    """

    # What it shows of training besides what is logged with prog_bar=True: the means of the last logging window.
    training_metrics = ("train/loss", "train/err_top1")

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._drawn_at = -float("inf")
        self._batches_done = 0
        self._epoch_shown = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._epoch_shown = False

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._batches_done, self._epoch_shown = 0, True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # A run resumed in the middle of an epoch gets no on_train_epoch_start: show the epoch, its length and
        # where it resumed, with a rate that counts only the iterations run since.
        if not self._epoch_shown:
            self.on_train_epoch_start(trainer, pl_module)
            bar = self.train_progress_bar
            if trainer.max_steps > 0:  # Lightning's total counts the iterations left from here, not the epoch's
                bar.total = min(trainer.num_training_batches, batch_idx + trainer.max_steps - trainer.global_step)
            bar.n = bar.initial = self._batches_done = batch_idx
            bar.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        # The training window's latest means, read here, when the bar redraws: logged with prog_bar=True, Lightning
        # would read them back from the device after every iteration.
        shown = {k: trainer.callback_metrics.get(k) for k in self.training_metrics}
        items = {k: float(v) for k, v in shown.items() if isinstance(v, torch.Tensor)}
        # The run's whole version (`seed1`, `version_3`) rather than Lightning's last four characters of it.
        items |= super().get_metrics(trainer, pl_module)
        version = items.pop("v_num", None)
        # Errors are percentages and accuracies fractions (as logged): the bar says which.
        items = {k: f"{v:.2f}%" if "/err_" in k and isinstance(v, float) else v for k, v in items.items()}
        if version is not None and trainer.logger is not None:
            version = trainer.logger.version
            items["run"] = f"version_{version}" if isinstance(version, int) else str(version)
        return items

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches_done = batch_idx + 1
        now = time.monotonic()
        if now - self._drawn_at >= self.interval_s or self._batches_done == self.train_progress_bar.total:
            self._drawn_at = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._catch_up()  # the training bar stays on screen, unchanged, for the whole validation
        super().on_validation_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._catch_up()
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._catch_up()
        super().on_train_end(trainer, pl_module)

    def _catch_up(self) -> None:
        """Show the iterations done since the last redraw."""
        bar = self.train_progress_bar
        if not bar.disable and bar.n != self._batches_done:
            bar.n = self._batches_done
            bar.refresh()


class _HostCountAveragedModel(AveragedModel):
    """torch's AveragedModel, keeping its number of updates on the host as well: its own `update_parameters` reads
    `n_averaged` from the device twice per update, a host-device sync per update on a GPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.host_count = 0

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().load_state_dict(state_dict, *args, **kwargs)
        self.host_count = int(self.n_averaged)  # once, on a resume
        return result

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine = [*self.module.parameters(), *self.module.buffers()] if self.use_buffers else [*self.parameters()]
        theirs = [*model.parameters(), *model.buffers()] if self.use_buffers else [*model.parameters()]
        pairs = [(a.detach(), b.detach().to(a.device)) for a, b in zip(mine, theirs, strict=True)]
        if self.host_count == 0:
            for averaged, current in pairs:
                averaged.copy_(current)
        else:
            groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
            for averaged, current in pairs:  # one foreach call per device and dtype, as torch's does
                group = groups.setdefault((averaged.device, averaged.dtype), ([], []))
                group[0].append(averaged)
                group[1].append(current)
            for averaged, current in groups.values():
                self.multi_avg_fn(averaged, current, self.n_averaged)
        self.n_averaged += 1
        self.host_count += 1


class EMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging (an exponential moving average of the weights, and of the BN statistics with
    `use_buffers`), with the update kept free of host-device syncs (`_HostCountAveragedModel`) and done with one
    foreach kernel per device and dtype rather than one per tensor.

    Validation runs on the average; after fit the model holds it; checkpoints store it as `state_dict`, with the
    live weights as `current_model_state`, so a resume goes on exactly (Lightning's behaviour).

    Args:
        decay: weight of the average at each update.
        update_every_n_steps: optimizer steps between updates.
        update_starting_at_step: the first step that updates; None from the start.
        use_buffers: average the buffers (BN statistics) too.
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        use_buffers: bool = True,
    ) -> None:
        super().__init__(
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        self._kwargs = {"multi_avg_fn": get_ema_multi_avg_fn(decay)}  # instead of the per-tensor avg_fn

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            if is_overridden("configure_model", pl_module):  # as Lightning's: the layers must exist to be copied
                pl_module.configure_model()
            self._average_model = _HostCountAveragedModel(
                model=pl_module, device=self._device or pl_module.device, use_buffers=self._use_buffers, **self._kwargs
            )
