"""The whole training iteration as one function (`GraphStepClassifier`, configs/presets/gpu_graph.yaml). A GPU
records it once as a CUDA graph; on a CPU the same function runs eagerly every iteration, and everything around the
capture is tested here: it trains exactly as the ordinary path (bit for bit), reads nothing back from the device,
resumes exactly, tables the scheduler's own learning rates, and keeps the warm-up of ResNet-110 eager until its switch.
On a GPU (accelerator auto) the same tests run with the capture, and the tests marked `gpu` compare the captured
step with the eager one and check that a replay never waits for the device; docs/benchmarks.md has the speed."""

from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from conftest import CONFIGS, QUIET, HostSyncs, SyncsPerIteration, quiet_trainer
from resnet_lab import CifarResNet, ImageClassifier
from resnet_lab.cli import ResNetLabCLI
from resnet_lab.errors import ConfigError
from resnet_lab.graph_step import GraphStep, GraphStepClassifier, lr_table
from resnet_lab.schedules import WarmupCosineLR, WarmupMultiStepLR

STEPS = 8  # two epochs of 4 iterations: an epoch boundary, a validation and checkpoints on the way
# ResNet-110's warm-up, made to end after two iterations: a threshold no random network's error is above.
QUICK_WARMUP = """
trainer:
  callbacks:
    - class_path: resnet_lab.callbacks.WarmupUntilTrainError
      init_args:
        threshold: 100.0
        window: 2
"""
SCHEDULES = {
    "paper": ["--config", str(CONFIGS / "resnet20_cifar.yaml"), "--model.lr_scheduler.init_args.milestones", "[3, 6]"],
    "paper_bf16": ["--config", str(CONFIGS / "resnet20_cifar.yaml"), "--config", str(CONFIGS / "presets" / "bf16.yaml"),
                   "--model.lr_scheduler.init_args.milestones", "[3, 6]"],
    "warmup_until_error": ["--config", str(CONFIGS / "resnet110_cifar.yaml"), "--config", "{quick_warmup}",
                           "--model.lr_scheduler.init_args.milestones", "[5, 7]"],
    "modern": ["--config", str(CONFIGS / "resnet56_cifar_modern.yaml"),
               "--model.lr_scheduler.init_args.warmup_steps", "3"],
}  # fmt: skip


def fit(cifar_root: Path, tmp_path: Path, schedule: str, *extra: str, accelerator: str = "cpu") -> ResNetLabCLI:
    """On the CPU unless told: a GPU's fused SGD computes with a float64 learning rate given as a number and a
    float32 one given as a tensor, so there the two paths agree to rounding only (test_on_a_gpu_...)."""
    warmup = tmp_path / "quick_warmup.yaml"
    warmup.write_text(QUICK_WARMUP)
    experiment = [arg.format(quick_warmup=warmup) for arg in SCHEDULES[schedule]]
    args = ["fit", *experiment, "--data.root", str(cifar_root), "--data.val_size", "50", "--data.batch_size", "16",
            "--data.num_workers", "0", "--model.backbone.init_args.depth", "8", "--trainer.limit_val_batches", "1",
            "--trainer.limit_train_batches", "4", "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "2",
            "--trainer.deterministic", "true", "--model.optimizer.init_args.fused", "true",
            "--trainer.accelerator", accelerator, *QUIET, *extra]  # fmt: skip
    return ResNetLabCLI(args=args)


def scalars(run: Path) -> dict[tuple[str, int], float]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    return {(t, e.step): e.value for t in acc.Tags()["scalars"] if not t.startswith("perf/") for e in acc.Scalars(t)}


def assert_same_training(a: dict, b: dict) -> None:
    """Two checkpoints of the same iteration: weights and BN statistics (and EMA's), momentum, learning rates,
    the scheduler and the counters, bit for bit."""
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):
        assert (key in a) == (key in b)
        for name, value in a.get(key, {}).items():
            assert torch.equal(value, b[key][name]), (key, name)
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"] == opt_b["param_groups"]  # the learning rates as floats, as the ordinary path
    for x, y in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    counted = (  # each path's own loop counts its iterations; Lightning steps (and counts) no scheduler under the graph
        "epoch_loop.automatic_optimization.optim_progress",
        "epoch_loop.manual_optimization.optim_step_progress",
        "epoch_loop.scheduler_progress",
    )
    assert {k: v for k, v in a["loops"]["fit_loop"].items() if k not in counted} == {
        k: v for k, v in b["loops"]["fit_loop"].items() if k not in counted
    }
    assert a["train_means"]["images"] == b["train_means"]["images"]
    assert torch.equal(a["train_means"]["sums"], b["train_means"]["sums"])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_the_graph_step_trains_bit_for_bit_as_the_ordinary_path(cifar_root, tmp_path, monkeypatch, schedule):
    monkeypatch.chdir(tmp_path)
    ordinary = fit(cifar_root, tmp_path, schedule, "--trainer.logger.init_args.version", "ordinary")
    graphed = fit(cifar_root, tmp_path, schedule, "--trainer.logger.init_args.version", "graph",
                  "--config", str(CONFIGS / "presets" / "gpu_graph.yaml"))  # fmt: skip
    assert not graphed.model.automatic_optimization and graphed.model.graph is not None
    runs = tmp_path / "logs" / ordinary.config.fit.experiment
    a = torch.load(runs / "ordinary" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(runs / "graph" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == STEPS
    assert_same_training(a, b)
    logged, expected = scalars(runs / "graph"), scalars(runs / "ordinary")
    assert logged == expected  # losses, errors, the learning rate curve, validation: every point, bit for bit
    lrs = sorted({v for (tag, _), v in expected.items() if tag.startswith("lr-")})
    assert len(lrs) >= 2  # the schedule changed the learning rate inside the run
    # The optimizer is left as the ordinary path leaves it: floats in its groups, the scheduler at the last step.
    groups = zip(ordinary.trainer.optimizers[0].param_groups, graphed.trainer.optimizers[0].param_groups, strict=True)
    for x, y in groups:
        assert type(y["lr"]) is float and x["lr"] == y["lr"]
    if schedule == "warmup_until_error":  # eager until the switch, then the table (on a GPU: the graph)
        switch = graphed.trainer.lr_scheduler_configs[0].scheduler.warmup_end
        assert switch == ordinary.trainer.lr_scheduler_configs[0].scheduler.warmup_end == 2
        assert graphed.model.graph.table_from == switch
    else:
        assert graphed.model.graph.table_from == 0


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["warmup_until_error", "paper"])
def test_a_graph_step_run_resumes_exactly_and_either_path_resumes_the_other(
    cifar_root, tmp_path, monkeypatch, schedule
):
    """Resumed at iteration 3: after the warm-up's switch, or on the paper schedule's first milestone (MultiStepLR
    computes each learning rate from the last one, which the restored optimizer holds)."""
    monkeypatch.chdir(tmp_path)
    every_3 = ["--checkpoint.every_n_train_steps", "3", "--checkpoint.save_top_k", "-1", "--checkpoint.monitor", "null"]
    graph = ["--config", str(CONFIGS / "presets" / "gpu_graph.yaml")]
    straight = fit(cifar_root, tmp_path, schedule, *graph, *every_3)
    folder = Path(straight.trainer.log_dir) / "checkpoints"
    ends = []
    for path in ([*graph], []):  # resumed at iteration 3 (after the warm-up's switch) by the graph, then eagerly
        resumed = fit(cifar_root, tmp_path, schedule, *path, "--ckpt_path", str(folder / "best-step3.ckpt"))
        ends.append(torch.load(Path(resumed.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=False))
    ends.append(torch.load(folder / "last.ckpt", weights_only=False))
    assert_same_training(ends[2], ends[0])
    assert_same_training(ends[2], ends[1])
    # ... and the eager path's checkpoint resumes under the graph likewise.
    eager = fit(cifar_root, tmp_path, schedule, *every_3)
    eager_folder = Path(eager.trainer.log_dir) / "checkpoints"
    resumed = fit(cifar_root, tmp_path, schedule, *graph, "--ckpt_path", str(eager_folder / "best-step3.ckpt"))
    assert resumed.model.graph.table_from == 3
    assert_same_training(
        torch.load(eager_folder / "last.ckpt", weights_only=False),
        torch.load(Path(resumed.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=False),
    )


def graph_step(fused: bool, schedule: bool = True) -> tuple[GraphStep, ImageClassifier]:
    torch.manual_seed(0)
    model = ImageClassifier(CifarResNet(8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=fused)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2], 0.1) if schedule else None
    return GraphStep(model.loss_and_means, optimizer, scheduler, step=0, total_steps=10), model


def test_the_step_reads_nothing_back_from_the_device():
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    step, model = graph_step(fused=True)
    step(images, labels)  # the first iteration makes the table and the momentum buffers
    before = model.backbone.fc.weight.clone()
    with HostSyncs() as mode:
        for _ in range(3):  # across the milestone: the learning rate changes inside the step
            loss, means = step(images, labels)
    assert mode.ops == []
    assert not torch.equal(before, model.backbone.fc.weight)  # the step did update the weights
    assert step.lrs.item() == pytest.approx(0.01) and step.counter.item() == 4
    # Positive controls: the mode sees a value read back, and the unfused SGD's read of a device learning rate.
    with HostSyncs() as mode:
        bool(loss > 0)
    assert mode.ops == ["_local_scalar_dense"]
    unfused, _ = graph_step(fused=False)
    unfused(images, labels)
    with HostSyncs() as mode:
        unfused(images, labels)
    assert "_local_scalar_dense" in mode.ops


def test_a_graph_step_fit_waits_on_the_device_only_where_the_loggers_write(cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    syncs = SyncsPerIteration()
    cli = fit(cifar_root, tmp_path, "paper", "--config", str(CONFIGS / "presets" / "gpu_graph.yaml"),
              "--trainer.log_every_n_steps", "4", "--trainer.max_steps", "7", "--trainer.limit_train_batches", "10",
              "--trainer.limit_val_batches", "0", "--trainer.callbacks+=conftest.SyncsPerIteration")  # fmt: skip
    syncs = next(c for c in cli.trainer.callbacks if isinstance(c, SyncsPerIteration))
    assert set(syncs.per_step) == set(range(1, 8))
    assert syncs.between_logging({4, 7}) == {}
    assert syncs.per_step[5]  # positive control: after iteration 4's hooks, the NaN check and the loggers read


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, [32000, 48000], 0.1),
        lambda opt: WarmupMultiStepLR(opt, [32000, 48000], warmup_steps=400),
        lambda opt: WarmupCosineLR(opt, warmup_steps=1000, total_steps=64000),
    ],
    ids=["paper", "warmup_400", "cosine"],
)
@pytest.mark.slow
def test_the_lr_table_is_the_scheduler_s_own_sequence_over_the_whole_schedule(make):
    def optimizer() -> torch.optim.Optimizer:  # two groups, as with no_norm_weight_decay
        return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                                {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.05}], lr=0.1)  # fmt: skip

    real_optimizer = optimizer()
    real = make(real_optimizer)
    expected = []
    for step in range(64000):
        if step == 40000:
            resumed_state = real.state_dict()
        expected.append([group["lr"] for group in real_optimizer.param_groups])
        real_optimizer.step()
        real.step()
    expected.append([group["lr"] for group in real_optimizer.param_groups])
    exact = torch.tensor(expected, dtype=torch.float64)
    expected = exact.float()
    fresh_optimizer = optimizer()
    table = lr_table(fresh_optimizer, make(fresh_optimizer), 0, 64000)
    assert torch.equal(table, expected)
    # From a state resumed at iteration 40000 (as a checkpoint restores it): the same rows from there on, and the
    # state itself untouched.
    resumed_optimizer = optimizer()
    resumed = make(resumed_optimizer)
    resumed.load_state_dict(resumed_state)
    for group, lr in zip(resumed_optimizer.param_groups, exact[40000].tolist(), strict=True):
        group["lr"] = lr
    tail = lr_table(resumed_optimizer, resumed, 40000, 64000)
    assert torch.equal(tail[40000:], expected[40000:]) and tail[:40000].isnan().all()
    assert resumed.state_dict() == resumed_state and resumed_optimizer.param_groups[0]["lr"] == exact[40000, 0].item()


def test_a_schedule_that_also_cycles_the_momentum_is_refused():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    cycling = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=100)
    with pytest.raises(ConfigError, match="OneCycleLR also changes momentum during the run"):
        lr_table(optimizer, cycling, 0, 100)
    steady = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=100, cycle_momentum=False)
    assert lr_table(optimizer, steady, 0, 100).shape == (101, 1)


def test_an_accumulation_schedule_is_refused(tmp_path):
    model = GraphStepClassifier(CifarResNet(8), optimizer=partial(torch.optim.SGD, lr=0.1, fused=True))
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))), batch_size=4)
    accumulating = GradientAccumulationScheduler({0: 2})
    with pytest.raises(ConfigError, match="set --trainer.accumulate_grad_batches 1, with no GradientAccumulation"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[accumulating]).fit(model, data)


def test_a_callback_that_needs_the_gradients_before_the_update_is_refused(tmp_path):
    class ClipsItself(Callback):  # what a fork's gradient logger or clipper looks like
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            torch.nn.utils.clip_grad_norm_(pl_module.parameters(), 1.0)

    model = GraphStepClassifier(CifarResNet(8), optimizer=partial(torch.optim.SGD, lr=0.1, fused=True))
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))), batch_size=4)
    with pytest.raises(ConfigError, match="ClipsItself uses a gradient hook .* which the captured step does not call"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[ClipsItself()]).fit(model, data)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the capture itself needs a GPU")


def cuda_step(capture: bool, depth: int = 20) -> tuple[GraphStep, ImageClassifier]:
    torch.manual_seed(0)
    model = ImageClassifier(CifarResNet(depth)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [10, 20], 0.1)
    step = GraphStep(model.loss_and_means, optimizer, scheduler, step=0, total_steps=30)
    step.capture = capture
    return step, model


@gpu
def test_on_a_gpu_the_captured_step_trains_bit_for_bit_as_the_eager_one(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(128, 3, 32, 32, generator=generator).cuda(),
                torch.randint(0, 10, (128,), generator=generator).cuda()) for _ in range(30)]  # fmt: skip
    (graphed, a), (eager, b) = cuda_step(capture=True), cuda_step(capture=False)
    for images, labels in batches:  # across both milestones: the learning rate changes inside the graph
        graphed(images, labels)
        eager(images, labels)
    assert graphed.graph is not None and graphed.replays == 30 - 3
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), f"{name}: {(x.float() - y.float()).abs().max().item()}"
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(graphed.optimizer.state[p]["momentum_buffer"], eager.optimizer.state[q]["momentum_buffer"])
    assert graphed.lrs.tolist() == eager.lrs.tolist() == [pytest.approx(0.001)]


@gpu
def test_on_a_gpu_a_replay_never_waits_for_the_device():
    step, _ = cuda_step(capture=True)
    images, labels = torch.randn(128, 3, 32, 32).cuda(), torch.randint(0, 10, (128,)).cuda()
    for _ in range(4):  # three eager iterations, then the capture
        step(images, labels)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            step(images, labels)
        with pytest.raises(RuntimeError, match="synchroniz"):  # positive control: a read back does raise
            step.lrs.item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.replays == 21


@gpu
def test_on_a_gpu_a_graph_step_fit_trains_as_the_ordinary_one_to_rounding(cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ordinary = fit(cifar_root, tmp_path, "paper", "--trainer.logger.init_args.version", "ordinary", accelerator="gpu")
    graphed = fit(cifar_root, tmp_path, "paper", "--trainer.logger.init_args.version", "graph", "--config",
                  str(CONFIGS / "presets" / "gpu_graph.yaml"), accelerator="gpu")  # fmt: skip
    assert graphed.model.graph.replays == STEPS - 3  # three eager iterations, then the graph
    runs = tmp_path / "logs" / ordinary.config.fit.experiment
    a = torch.load(runs / "ordinary" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    b = torch.load(runs / "graph" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert a["global_step"] == b["global_step"] == STEPS and a["lr_schedulers"] == b["lr_schedulers"]
    assert a["optimizer_states"][0]["param_groups"] == b["optimizer_states"][0]["param_groups"]
    for name, value in a["state_dict"].items():  # the float32 learning rate's rounding, grown over 8 iterations
        assert torch.allclose(value.float(), b["state_dict"][name].float(), rtol=1e-3, atol=1e-5), name


def test_ckpt_path_last_finds_the_run_with_or_without_the_graph_step(cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    graph = ["--config", str(CONFIGS / "presets" / "gpu_graph.yaml")]
    first = fit(cifar_root, tmp_path, "paper", *graph, "--trainer.max_steps", "3")
    resumed = fit(cifar_root, tmp_path, "paper", "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert resumed.trainer.log_dir == first.trainer.log_dir and resumed.trainer.global_step == 3
    assert type(resumed.model) is ImageClassifier  # the command's own class: the ordinary path


def test_the_old_graph_step_setting_is_refused_on_the_command_line_and_names_the_class(cifar_root, tmp_path):
    # A checkpoint that holds it is evaluated and resumed (its value is replaced by the command's; test_module.py
    # loads one outside the command line); the user's own setting would silently train the ordinary step.
    with pytest.raises(ConfigError, match=r"--model.graph_step true: .*--model resnet_lab.graph_step.GraphStepClass"):
        fit(cifar_root, tmp_path, "paper", "--model.graph_step", "true")
