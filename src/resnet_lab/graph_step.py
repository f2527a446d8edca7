"""The whole training iteration as one CUDA graph: `GraphStepClassifier`, configs/presets/gpu_graph.yaml.

At the paper's batch of 128 a CIFAR ResNet-20 iteration keeps an H100 busy for under 2 ms, and Lightning's loop,
the optimizer and the scheduler spend more than that launching its kernels one by one from Python
(docs/benchmarks.md). Here one function makes the whole iteration on fixed tensors: forward, loss, backward,
torch's fused SGD update at a learning rate read from device memory, the next iteration's learning rate from a
table of the whole schedule, and the training sums. On a GPU it is recorded once and replayed every iteration;
on a CPU the same function runs eagerly every iteration, which is how it is tested without a GPU.

Lightning trains the module under manual optimization and sees `CountingOptimizer`, whose `step()` makes no
update: Lightning counts the iteration (`global_step`, `max_steps`, checkpoints) while the update is made in the
graph. The scheduler is not stepped per iteration: its state is brought up to date, from a copy, whenever a
checkpoint is written and when training ends, so checkpoints are those of the ordinary path and either path
resumes the other's.

A warm-up whose end depends on training (ResNet-110's "until the training error is below 80%") runs eagerly, the
scheduler stepped every iteration, until the switch; the table is then made and the step captured.

Torch's own `torch.cuda.make_graphed_callables` graphs forward and backward but not the optimizer step, and
Lightning has no graph mode (its issue #10174): hence this module.
"""

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler, StochasticWeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from resnet_lab.errors import ConfigError
from resnet_lab.module import ImageClassifier

# The graph step keeps each group's learning rate as a device tensor (the fused update reads it there), which
# LearningRateMonitor copies with torch.tensor().
warnings.filterwarnings(
    "ignore", message="To copy construct from a tensor", module="lightning.pytorch.callbacks.lr_monitor"
)
# ... and trains under manual optimization, where ModelCheckpoint warns that a checkpoint holds the weights after the
# iteration's update: so do the ordinary path's.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")

# Eager iterations on a side stream before the capture: they create the momentum buffers and let cuDNN's autotuner
# and the caching allocator settle, as CUDA graph capture requires.
EAGER_ITERATIONS_BEFORE_CAPTURE = 3
# Hooks the step never calls between the backward and the update, or calls only after the update was made.
GRADIENT_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad")

LossAndMeans = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def counting(optimizer: Optimizer) -> "CountingOptimizer":
    """`optimizer` as Lightning is to see it, under the class name of the optimizer it wraps: LearningRateMonitor
    names its curves after the class (lr-SGD), and they are to be those of the ordinary path."""
    return type(type(optimizer).__name__, (CountingOptimizer,), {})(optimizer)


class CountingOptimizer(Optimizer):
    """The optimizer Lightning is given when the update is made inside the captured step: `step()` only runs
    Lightning's closure (its hooks), so that Lightning counts the iteration. Parameter groups, state and
    `state_dict()` are the wrapped optimizer's own, so checkpoints are those of the ordinary path.

    Args:
        optimizer: the optimizer whose update the step makes.
    """

    def __init__(self, optimizer: Optimizer) -> None:  # no super().__init__(): every attribute is the wrapped one's
        self.optimizer = optimizer

    # Read through, never kept: `load_state_dict` gives the wrapped optimizer new group and state objects, which the
    # scheduler (built on this optimizer) must step.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # noqa: ANN401 - whatever the closure returns
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"CountingOptimizer({self.optimizer!r})"


def detached_copy(scheduler: LRScheduler) -> LRScheduler:
    """A copy of `scheduler` in its current state, stepping a stand-in optimizer that holds the same parameter
    groups' settings (learning rates as Python floats) over no real parameter."""
    stand_in = SGD([torch.zeros(())], lr=0.0)
    stand_in.param_groups = [
        {**{k: float(v) if k == "lr" else v for k, v in group.items() if k != "params"}, "params": []}
        for group in scheduler.optimizer.param_groups
    ]
    return copy.deepcopy(scheduler, memo={id(scheduler.optimizer): stand_in})


def group_lrs(optimizer: Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


def group_settings(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Each group's settings but its learning rate."""
    return [{k: v for k, v in group.items() if k not in ("lr", "params")} for group in optimizer.param_groups]


def step_quietly(scheduler: LRScheduler) -> None:
    with warnings.catch_warnings():  # the optimizer's own step() is not the update: torch warns that it looks unused
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        warnings.filterwarnings("ignore", message=r"Seems like `optimizer.step\(\)` has been overridden")
        scheduler.step()


def lr_table(optimizer: Optimizer, scheduler: LRScheduler | None, start: int, stop: int) -> Tensor:
    """The learning rate of every parameter group at every iteration from `start` (the iteration about to be made,
    which `scheduler` is at) to `stop` inclusive: a float32 tensor [stop + 1, groups] whose rows before `start` are
    NaN. Row s is the learning rate the ordinary path trains iteration s with; row `stop`, the one after the last
    iteration, is what the scheduler leaves in the optimizer at the end."""
    rows = [group_lrs(optimizer)]
    if scheduler is None:
        rows *= stop - start + 1
    else:
        schedule = detached_copy(scheduler)
        settings = group_settings(schedule.optimizer)
        for _ in range(start, stop):
            step_quietly(schedule)
            rows.append(group_lrs(schedule.optimizer))
            now = group_settings(schedule.optimizer)
            if now != settings:  # OneCycleLR and CyclicLR cycle the momentum too, which the graph holds fixed
                changed = sorted({k for a, b in zip(settings, now, strict=True) for k in a if a[k] != b.get(k)})
                raise ConfigError(
                    f"the graph step (GraphStepClassifier): {type(scheduler).__name__} also changes "
                    f"{', '.join(changed)} during the run, and the captured step tables only the learning rate: use "
                    "a schedule of the learning rate alone (or cycle_momentum: false)"
                )
    table = torch.full((stop + 1, len(rows[0])), float("nan"), dtype=torch.float64)
    table[start:] = torch.tensor(rows, dtype=torch.float64)
    return table.float()


def lr_ahead_known(scheduler: LRScheduler | None) -> bool:
    """Whether the learning rate of every later iteration is known now: False while a warm-up waits for a callback
    to end it (`WarmupMultiStepLR` with `warmup_steps: null`)."""
    return getattr(scheduler, "lr_ahead_known", True)


def compiles_cuda_graphs(mode: str) -> bool:
    from torch._inductor import list_mode_options  # here: loading inductor costs the command line a second

    return bool(list_mode_options(mode).get("triton.cudagraphs"))


def check_supported(trainer: Trainer, module: ImageClassifier) -> None:
    """Refuse, in one line, what a captured step cannot train as the ordinary path does. Called when the trainer is
    made (before any data-parallel process starts) and again when fit starts."""
    refusal = None
    # The optimizer and the schedule as the run will build them, over a stand-in parameter: the trainer is made
    # before the module's own are.
    optimizer = module.build_optimizer([torch.nn.Parameter(torch.zeros(1))])
    optimizer = optimizer.optimizer if isinstance(optimizer, CountingOptimizer) else optimizer
    schedule = module.lr_scheduler(optimizer) if module.lr_scheduler is not None else None
    backend, mode = module.hparams.get("compile_backend", "inductor"), module.hparams.get("compile_mode")
    own_graphs = backend == "cudagraphs" or (backend == "inductor" and compiles_cuda_graphs(mode))
    callbacks = trainer.callbacks
    hooked = [type(c).__name__ for c in [*callbacks, module] if any(is_overridden(h, c) for h in GRADIENT_HOOKS)]
    if trainer.world_size > 1:
        refusal = (
            f"it replays one process's step, and this run has {trainer.world_size} processes: train on one device "
            "(leave out presets/ddp.yaml, --trainer.devices 1)"
        )
    elif str(trainer.precision) in ("16-mixed", "16"):
        refusal = "fp16's loss scaling (GradScaler) cannot be captured: use configs/presets/bf16.yaml instead"
    elif trainer.accumulate_grad_batches != 1 or any(isinstance(c, GradientAccumulationScheduler) for c in callbacks):
        refusal = (
            "each replay is one whole update: set --trainer.accumulate_grad_batches 1, with no "
            "GradientAccumulationScheduler"
        )
    elif any(isinstance(c, StochasticWeightAveraging) for c in callbacks):
        refusal = (
            "StochasticWeightAveraging swaps in a schedule of its own during the run, which the tabled learning rate "
            "would ignore: leave it out (presets/ema.yaml averages the weights without touching the schedule)"
        )
    elif trainer.gradient_clip_val:
        refusal = "gradient clipping is not in the captured step: leave out presets/grad_clip.yaml"
    elif type(optimizer) is not SGD:
        refusal = (
            f"the update is torch.optim.SGD's fused kernel, which reads a learning rate held on the device; this "
            f"run's optimizer is {type(optimizer).__name__}: use torch.optim.SGD"
        )
    elif not optimizer.defaults.get("fused"):
        refusal = (
            "the update is SGD's fused kernel (the others read a device learning rate back to the host every "
            "iteration): set --model.optimizer.init_args.fused true (configs/presets/gpu_fast.yaml does)"
        )
    elif isinstance(schedule, ReduceLROnPlateau):
        refusal = (
            "ReduceLROnPlateau follows a validation metric, and the step tables the learning rate of every iteration "
            "ahead: use a schedule of iterations (MultiStepLR, resnet_lab.schedules.WarmupCosineLR, ...)"
        )
    elif schedule is not None and module.scheduler_interval != "step":
        refusal = (
            "the step tables the learning rate of every iteration ahead, and this schedule is stepped per epoch: give "
            "it in iterations, its milestones (or other lengths) converted to iterations too, with "
            "--model.scheduler_interval step"
        )
    elif module.compiled and own_graphs:
        what = f"compile_backend {backend}" if backend == "cudagraphs" else f"compile_mode {mode}"
        refusal = (
            f"{what} records CUDA graphs of its own, which cannot be captured inside the step's: use compile_mode "
            "default or max-autotune-no-cudagraphs with the inductor backend (configs/presets/gpu_graph.yaml sets "
            "default)"
        )
    elif getattr(module.backbone, "activation_checkpointing", False):
        refusal = (
            "activation checkpointing saves and restores the CUDA random state around each recomputed unit, which "
            "a capture cannot: train with activation_checkpointing false, or without the graph step"
        )
    elif trainer.max_steps < 0 and (trainer.max_epochs is None or trainer.max_epochs < 0):
        refusal = (
            "the step tables the learning rate of the whole run, which has no end: set --trainer.max_steps (or "
            "--trainer.max_epochs)"
        )
    elif hooked:
        refusal = (
            f"{hooked[0]} uses a gradient hook ({', '.join(GRADIENT_HOOKS)}), which the captured step does "
            "not call between the backward and the update: leave it out, or train without the graph step"
        )
    if refusal is not None:
        raise ConfigError(f"the graph step (GraphStepClassifier): {refusal}")
    if schedule is not None:  # a schedule that cycles the momentum (OneCycleLR) shows it in its first steps
        lr_table(optimizer, schedule, 0, 3)


class GraphStep:
    """Makes each training iteration with one function on fixed tensors: recorded once as a CUDA graph and replayed
    on a GPU, run eagerly on a CPU.

    Args:
        loss_and_means: forward and loss of a batch, adding its training metrics to the module's running sums;
            returns the loss and the batch's metric means (`ImageClassifier.loss_and_means`).
        optimizer: the SGD optimizer the update is made with (fused, so that it reads its learning rate from the
            device).
        scheduler: its learning-rate schedule, stepped every iteration on the ordinary path; None: constant.
        step: the iteration about to be made (`global_step`: nonzero when resumed).
        total_steps: the iterations of the whole run.
    """

    def __init__(
        self,
        loss_and_means: LossAndMeans,
        optimizer: Optimizer,
        scheduler: LRScheduler | None,
        step: int,
        total_steps: int,
    ) -> None:
        self.loss_and_means = loss_and_means
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.step_now = step
        self.total_steps = total_steps
        self.device = optimizer.param_groups[0]["params"][0].device
        self.capture = self.device.type == "cuda"
        self.table: Tensor | None = None
        self.table_from: int | None = None  # the iteration the table (and on a GPU the graph) took over from
        self.schedule: LRScheduler | None = None  # a copy of the scheduler, advanced only when it is read
        self.schedule_step = step
        self.counter = torch.tensor(step, device=self.device)
        self.lrs = torch.tensor(group_lrs(optimizer), device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_left = EAGER_ITERATIONS_BEFORE_CAPTURE
        self.static: tuple[Tensor, ...] | None = None  # images, labels, loss, means
        self.host_lrs: list[float] = []
        self.replays = 0

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """One training iteration on this batch, its update included; returns the loss and the metric means."""
        if self.table is None and lr_ahead_known(self.scheduler):
            self._start_table()
        if self.table is None:  # a warm-up that a callback will end: as the ordinary path, eagerly
            out = self._iteration(images, labels)
            if self.scheduler is not None:
                step_quietly(self.scheduler)
        elif not self.capture:
            out = self._iteration(images, labels)
        else:
            out = self._replay(images, labels)
        self.step_now += 1
        return out

    def _iteration(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The whole iteration; on a GPU, what the graph records. Nothing in it reads a value back to the host."""
        self.optimizer.zero_grad(set_to_none=True)  # when captured: the backward allocates them in the graph's pool
        loss, means = self.loss_and_means(images, labels)  # under the precision's autocast, as Lightning's step
        with torch.autocast(self.device.type, enabled=False):  # the backward and update outside it, as Lightning's
            loss.backward()
            self.optimizer.step()
            if self.table is not None:
                self.counter += 1
                self.lrs.copy_(self.table.index_select(0, self.counter.view(1)).view(-1))  # the next iteration's
        return loss.detach(), means

    def _start_table(self) -> None:
        self.host_lrs = group_lrs(self.optimizer)  # as given, not rounded to float32: what a checkpoint keeps
        self.table = lr_table(self.optimizer, self.scheduler, self.step_now, self.total_steps).to(self.device)
        self.table_from = self.step_now
        self.counter.fill_(self.step_now)
        self.lrs.copy_(self.table[self.step_now])
        if self.scheduler is not None:
            self.schedule, self.schedule_step = detached_copy(self.scheduler), self.step_now
        # The fused update reads each group's learning rate from these device tensors (a view each), which the
        # step itself sets: a Python float put into a group now would be frozen into the graph.
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lrs[i]

    def _replay(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.static is None or self.static[0].shape != images.shape or self.static[1].shape != labels.shape:
            if self.graph is not None:  # a batch of another size than the graph's: once, eagerly
                return self._iteration(images, labels)
            self.static = (images.clone(), labels.clone())
        fixed_images, fixed_labels = self.static[:2]
        fixed_images.copy_(images)
        fixed_labels.copy_(labels)
        if self.graph is None:
            if self.eager_left:
                self.eager_left -= 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self._iteration(fixed_images, fixed_labels)
                torch.cuda.current_stream().wait_stream(side)
                return out
            self.graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            # thread_local: a loader's pin-memory thread may use CUDA while this thread captures.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.static = (fixed_images, fixed_labels, *self._iteration(fixed_images, fixed_labels))
        self.graph.replay()
        self.replays += 1
        return self.static[2], self.static[3]

    def scheduler_state(self) -> tuple[list[dict], list[float]]:
        """Bring the scheduler up to the current iteration, as the ordinary path would have stepped it; returns its
        state and the groups' learning rates as floats, for a checkpoint."""
        if self.schedule is None:  # no schedule (a constant learning rate), or the table is not made yet
            states = [self.scheduler.state_dict()] if self.scheduler is not None else []
            return states, (group_lrs(self.optimizer) if self.table is None else self.host_lrs)
        for _ in range(self.schedule_step, self.step_now):
            step_quietly(self.schedule)
        self.schedule_step = self.step_now
        self.scheduler.load_state_dict(self.schedule.state_dict())
        return [self.schedule.state_dict()], group_lrs(self.schedule.optimizer)

    def finish(self) -> None:
        """Leave the optimizer and the scheduler as the ordinary path would: floats in the groups, the scheduler at
        the current iteration."""
        self.graph = self.static = None  # the graph's memory pool goes back (a test after fit needs none of it)
        if self.table is None:
            return
        _, lrs = self.scheduler_state()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr


class GraphStepClassifier(ImageClassifier):
    """`ImageClassifier` whose training iteration (forward, loss, backward, the fused SGD update, the next learning
    rate and the training sums) is one function that a GPU records once as a CUDA graph and replays; on a CPU it
    runs eagerly. It trains exactly as `ImageClassifier` does, with the same arguments and checkpoints (either
    resumes the other's run), and refuses in one line what it cannot (`check_supported`: fp16, data parallelism,
    gradient accumulation or clipping, an optimizer other than fused SGD, a schedule stepped per epoch).

    `--model resnet_lab.graph_step.GraphStepClassifier`, or stack configs/presets/gpu_graph.yaml.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The update is made inside the step: Lightning only counts it (CountingOptimizer).
        self.automatic_optimization = False
        self.graph: GraphStep | None = None  # made when training starts, after any checkpoint is restored

    def training_iteration(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.graph(images, labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        outputs = super().training_step(batch, batch_idx)
        self.optimizers().step()  # counts the iteration: the update is already made
        return outputs

    def check_trainer(self, trainer: Trainer) -> None:
        check_supported(trainer, self)

    def build_optimizer(self, parameters: list) -> Optimizer:
        return counting(super().build_optimizer(parameters))

    def configure_optimizers(self):  # noqa: ANN201 - as ImageClassifier's
        configured = super().configure_optimizers()
        if isinstance(configured, dict):  # no schedule on a metric under manual optimization (refused): Lightning
            configured["lr_scheduler"].pop("monitor", None)  # warns of the key
        return configured

    def on_train_start(self) -> None:
        super().on_train_start()
        optimizer = self.trainer.optimizers[0].optimizer
        configs = self.trainer.lr_scheduler_configs
        schedule = configs[0].scheduler if configs else None
        total = int(self.trainer.estimated_stepping_batches)
        self.graph = GraphStep(self.loss_and_means, optimizer, schedule, self.global_step, total)

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.graph is not None:
            self.graph.finish()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.graph is not None and "optimizer_states" in checkpoint:
            # The scheduler and the learning rates as the ordinary path saves them (it steps the scheduler every
            # iteration; the graph reads its learning rates from a table): either path resumes the other's run.
            schedulers, lrs = self.graph.scheduler_state()
            checkpoint["lr_schedulers"] = schedulers
            for group, lr in zip(checkpoint["optimizer_states"][0]["param_groups"], lrs, strict=True):
                group["lr"] = lr
