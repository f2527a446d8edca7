"""Training speed and memory, each figure measured against its reference in the same process.

    python benchmarks/train_speed.py                  # CPU: a few minutes
    python benchmarks/train_speed.py --device cuda    # GPU: bf16-mixed, fused SGD, compiled (CUDA graphs)

1. Lightning `fit` of ImageClassifier against a hand-written PyTorch loop: same network, optimizer, batches and
   precision (CIFAR ResNet-20 and ResNet-110; ImageNet ResNet-50 on synthetic 224x224 batches).
   Also the time per iteration of both on a network with next to no compute: the cost of the loop itself.
2. Our ImageNet ResNet-50 (torchvision's stride placement) against torchvision.models.resnet50, forward+backward.
3. CIFAR data pipeline: device-resident batches against the DataLoader path, and against ResNet-20's own
   training throughput.
4. Peak memory of one ResNet-110 / ResNet-1202 training step, with and without activation checkpointing
   (CUDA max allocated on a GPU; peak RSS of a fresh process on a CPU).
5. The graph step (`GraphStepClassifier`, configs/presets/gpu_graph.yaml): milliseconds per iteration of CIFAR
   ResNet-20 and ResNet-110 with the whole step captured, alone (one fixed batch, no Lightning) and inside `fit`,
   beside the ordinary path's `fit` (gpu_fast: compiled with CUDA graphs of forward and backward) and the
   hand-written loop, in the same run.
   On a CPU nothing is captured: the rows then measure the eager step.
6. On a CPU, configs/presets/cpu_fast.yaml (with bf16 where the CPU has bfloat16 instructions) on ResNet-20 and
   ResNet-56: its fit against the fp32 fit without it and against a hand-written loop with the same settings, and
   the GFLOP/s it reaches against a 4096x4096 matrix product in the same precision; on a CPU without bfloat16
   instructions, also bf16-mixed against fp32 in the hand-written loop.

Prints a Markdown table and writes JSON (--json). `--only graph recipe ...` measures some rows only (and writes
JSON only where --json names a file).
"""

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from torchvision.transforms import v2

from resnet_lab import CifarResNet, ImageClassifier, ImageNetResNet
from resnet_lab.callbacks import (
    EMA,
    CheckpointOnSignal,
    PeriodicCheckpoint,
    SpeedMonitor,
    StopOnNonFiniteLoss,
    ValidateAtMaxSteps,
)
from resnet_lab.data.base import Standardize
from resnet_lab.data.batches import (
    BatchAugmentation,
    BatchOrder,
    BatchTransforms,
    DeviceBatches,
    EachImage,
    MixBatch,
    PadCropFlip,
)
from resnet_lab.graph_step import GraphStep, GraphStepClassifier
from resnet_lab.records import cpu_has_bf16, cpu_info

GROUPS = ("cifar", "cpu_fast", "recipe", "graph", "overhead", "resnet50", "pipeline", "memory")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):  # noqa: ANN201
    if precision == "bf16-mixed":  # no weight cache, as Lightning's: a CUDA graph cannot capture one
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


class PerImage(torch.utils.data.Dataset):
    """uint8 images transformed one at a time, as a DataLoader pipeline does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: torch.nn.Module) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class Repeat:
    """The same batch, `steps` times: a data-free stream for measuring the model alone."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):  # noqa: ANN204
        return (self.batch for _ in range(self.steps))


def sgd(params, fused: bool = False):  # noqa: ANN001, ANN201
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=fused or None)


class CifarStream:
    """Device-resident CIFAR batches, pad-crop-flipped and normalised by the data module's `BatchTransforms`."""

    batch_sampler = None

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch: int,
        normalize: Standardize,
        augmentations: list[BatchAugmentation] | None = None,
        mixing: MixBatch | None = None,
    ) -> None:
        self.batches = DeviceBatches(images, labels, BatchOrder(len(labels), batch, True, device=images.device))
        self.transforms = BatchTransforms(augmentations or [PadCropFlip(4)], normalize, 10, mixing)

    @property
    def sampler(self) -> BatchOrder:
        return self.batches.order

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):  # noqa: ANN204
        for images, labels, key in self.batches:
            yield self.transforms(images, labels, key)


def cifar_stream(
    device: torch.device,
    batch: int,
    steps: int,
    seed: int = 0,
    augmentations: list[BatchAugmentation] | None = None,
    mixing: MixBatch | None = None,
) -> CifarStream:
    g = torch.Generator().manual_seed(seed)
    n = batch * steps
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (n,), generator=g).to(device)
    normalize = Standardize(torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25))
    return CifarStream(images, labels, batch, normalize, augmentations, mixing)


def imagenet_stream(device: torch.device, batch: int, steps: int) -> Repeat:
    x = torch.randn(batch, 3, 224, 224, device=device)
    return Repeat((x, torch.randint(0, 1000, (batch,), device=device)), steps)


class StepTimer(L.Callback):
    """Wall time from the end of iteration `warmup` to the end of the last one."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.steps = trainer.global_step - self.warmup
            if trainer.global_step == trainer.max_steps:
                sync(pl_module.device)
                self.end = time.perf_counter()


def lightning_rate(
    net,
    stream,
    device,
    precision,
    warmup,
    batch,
    compile_mode,
    extra=(),
    graph_step=False,
    channels_last=True,
) -> float:
    model = (GraphStepClassifier if graph_step else ImageClassifier)(
        net,
        optimizer=functools.partial(sgd, fused=device.type == "cuda" or graph_step),
        channels_last=channels_last,
        compile=compile_mode is not None,
        compile_mode=compile_mode or "default",
    )
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            precision=precision,
            max_steps=len(stream),
            logger=L.pytorch.loggers.TensorBoardLogger(logs, name="bench"),
            log_every_n_steps=50,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            # A CLI run's callbacks that act while training (all but the progress bar, model summary and config
            # saver): Lightning calls each one's hooks on every iteration.
            callbacks=[
                timer,
                ValidateAtMaxSteps(),
                SpeedMonitor(),
                StopOnNonFiniteLoss(),
                CheckpointOnSignal(),
                ModelCheckpoint(monitor="val/err_top1"),
                ModelCheckpoint(filename="last"),
                PeriodicCheckpoint(),
                LearningRateMonitor("step"),
                *extra,
            ],
        )
        trainer.fit(model, stream)
    return timer.steps * batch / (timer.end - timer.start)


def raw_rate(net, stream, device, precision, warmup, batch, compile_mode=None, channels_last=True) -> float:  # noqa: ANN001
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device, memory_format=layout).train()
    if compile_mode is not None:
        net.compile(mode=compile_mode)
    optimizer = sgd(net.parameters(), fused=device.type == "cuda")
    start, steps = 0.0, 0
    for step, (x, y) in enumerate(stream, 1):
        with autocast(device, precision):
            loss = F.cross_entropy(net(x.contiguous(memory_format=layout)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        steps = step - warmup
    sync(device)
    return steps * batch / (time.perf_counter() - start)


class PoolLinear(torch.nn.Module):
    """Global average pooling and a linear layer: next to no compute, so an iteration's time is the loop's own."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = torch.nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def compare_overhead(device, precision, rounds) -> dict:  # noqa: ANN001
    """Milliseconds per iteration of fit and of the hand-written loop on PoolLinear: the per-iteration cost of the
    loop itself (Lightning's hooks, callbacks and closure against a bare loop), which bounds how fast any small
    network can train however fast the device is."""
    batch, steps, warmup = 2, 1500, 200

    def stream() -> CifarStream:
        return cifar_stream(device, batch, steps)

    fit, raw = best_of(
        rounds,
        lambda: lightning_rate(PoolLinear(), stream(), device, precision, warmup, batch, None),
        lambda: raw_rate(PoolLinear(), stream(), device, precision, warmup, batch),
    )
    return {
        "figure": "loop time per iteration, near-zero-compute network (pool + linear), batch 2",
        "ours": 1000 * batch / fit,
        "reference": 1000 * batch / raw,
        "unit": "ms",
        "reference_name": "hand-written loop",
        "ratio": raw / fit,  # = ours / reference in ms, as in every other row
    }


def best_of(rounds: int, *measures) -> tuple[float, ...]:  # noqa: ANN002
    """Alternate the measurements (images/s) `rounds` times and keep each one's best: on a shared machine
    interference only ever slows a run down, so the best is the least disturbed."""
    results: list[list[float]] = [[] for _ in measures]
    for _ in range(rounds):
        for measure, out in zip(measures, results, strict=True):
            torch.manual_seed(0)
            torch._dynamo.reset()  # a compile must not see the previous network's shapes (dynamic-shape recompiles)
            start = time.perf_counter()
            out.append(measure())
            print(f"  {out[-1]:,.1f} images/s ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return tuple(max(out) for out in results)


def compare_fit(name, make_net, make_stream, device, precision, batch, warmup, rounds, compile_mode) -> dict:  # noqa: ANN001
    fit, raw = best_of(
        rounds,
        lambda: lightning_rate(make_net(), make_stream(), device, precision, warmup, batch, compile_mode),
        lambda: raw_rate(make_net(), make_stream(), device, precision, warmup, batch, compile_mode),
    )
    if compile_mode is not None:
        name += f", compiled ({compile_mode})"
    return {
        "figure": f"fit throughput, {name}",
        "ours": fit,
        "reference": raw,
        "unit": "images/s",
        "reference_name": "hand-written loop",
        "ratio": fit / raw,
    }


def matmul_rate(precision: str) -> float:
    """GFLOP/s of a 4096x4096 matrix product on the CPU in the precision's compute type: the CPU's own ceiling."""
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    a @ b
    start, n = time.perf_counter(), 3
    for _ in range(n):
        a @ b
    return n * 2 * 4096**3 / (time.perf_counter() - start) / 1e9


def training_flops_per_image(net: torch.nn.Module) -> float:
    """Forward and backward FLOPs of one 32x32 image (counted by torch's FlopCounterMode over one step)."""
    x = torch.randn(8, 3, 32, 32)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def compare_cpu_fast(depth, batch, steps, warmup, rounds) -> list[dict]:  # noqa: ANN001
    """configs/presets/cpu_fast.yaml (with bf16.yaml where the CPU has bfloat16 instructions, as its header says)
    against the fp32 fit without it and against a hand-written loop with the same settings, and the GFLOP/s it
    reaches against the CPU's matrix-product rate in the same precision."""
    preset = yaml.safe_load((Path(__file__).parents[1] / "configs/presets/cpu_fast.yaml").read_text())
    fast = preset["model"]["channels_last"]
    precision = "bf16-mixed" if cpu_has_bf16() else "32-true"
    device = torch.device("cpu")

    def stream() -> CifarStream:
        return cifar_stream(device, batch, steps)

    def fit(precision: str, channels_last: bool) -> float:
        net = CifarResNet(depth)
        return lightning_rate(net, stream(), device, precision, warmup, batch, None, channels_last=channels_last)

    preset_fit, fp32_fit, raw = best_of(
        rounds,
        lambda: fit(precision, fast),
        lambda: fit("32-true", False),
        lambda: raw_rate(CifarResNet(depth), stream(), device, precision, warmup, batch, channels_last=fast),
    )
    name = f"fit throughput, CIFAR ResNet-{depth}, batch {batch}, cpu_fast ({precision}, channels_last {fast})"
    achieved = preset_fit * training_flops_per_image(CifarResNet(depth)) / 1e9
    ceiling = matmul_rate(precision)
    return [
        {"figure": name, "ours": preset_fit, "reference": fp32_fit, "unit": "images/s",
         "reference_name": "fp32 fit, default layout", "ratio": preset_fit / fp32_fit},
        {"figure": name, "ours": preset_fit, "reference": raw, "unit": "images/s",
         "reference_name": "hand-written loop, same settings", "ratio": preset_fit / raw},
        {"figure": "GFLOP/s of that fit (training FLOPs per image x images/s)", "ours": achieved,
         "reference": ceiling, "unit": "GFLOP/s", "reference_name": f"4096x4096 matmul, {precision}",
         "ratio": achieved / ceiling},
    ]  # fmt: skip


def compare_emulated_bf16(batch: int) -> dict:
    """On a CPU without bfloat16 instructions: a hand-written ResNet-20 loop in bf16-mixed against fp32 (few
    iterations: emulated bf16 is slow), why cpu_fast.yaml leaves bf16 out there."""
    device = torch.device("cpu")
    bf16, fp32 = best_of(
        1,
        lambda: raw_rate(CifarResNet(20), cifar_stream(device, batch, 6), device, "bf16-mixed", 2, batch),
        lambda: raw_rate(CifarResNet(20), cifar_stream(device, batch, 6), device, "32-true", 2, batch),
    )
    return {
        "figure": f"hand-written loop, CIFAR ResNet-20, batch {batch}, bf16-mixed on a CPU without bf16 instructions",
        "ours": bf16,
        "reference": fp32,
        "unit": "images/s",
        "reference_name": "the same loop in fp32",
        "ratio": bf16 / fp32,
    }


def compare_recipe(device, precision, batch, steps, warmup, rounds, compile_mode) -> dict:  # noqa: ANN001
    """ResNet-20 with the trivialaugment, mixup and ema presets against the paper's recipe, both Lightning fits."""
    modern = [PadCropFlip(4), EachImage(v2.TrivialAugmentWide())]
    mixup = MixBatch(v2.MixUp(alpha=0.2, num_classes=10))

    def rate(augmentations: list[BatchAugmentation] | None, mixing: MixBatch | None, extra: tuple) -> float:
        stream = cifar_stream(device, batch, steps, augmentations=augmentations, mixing=mixing)
        return lightning_rate(CifarResNet(20), stream, device, precision, warmup, batch, compile_mode, extra)

    ours, paper = best_of(rounds, lambda: rate(modern, mixup, (EMA(decay=0.999),)), lambda: rate(None, None, ()))
    return {
        "figure": f"fit throughput, CIFAR ResNet-20, batch {batch}, trivialaugment + mixup + ema presets",
        "ours": ours,
        "reference": paper,
        "unit": "images/s",
        "reference_name": "the paper's recipe",
        "ratio": ours / paper,
    }


def graph_alone_rate(depth, device, precision, batch, steps, warmup, compile_mode) -> float:  # noqa: ANN001
    """The graph step without Lightning or data: one fixed batch copied in and the step replayed."""
    model = ImageClassifier(
        CifarResNet(depth), channels_last=True, compile=compile_mode is not None, compile_mode=compile_mode or "default"
    ).to(device)
    optimizer = sgd(model.parameters(), fused=True)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [32000, 48000], 0.1)
    step = GraphStep(model.loss_and_means, optimizer, scheduler, 0, steps + warmup)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    start = 0.0
    with autocast(device, precision):
        for i in range(1, steps + warmup + 1):
            step(images, labels)
            if i == warmup:
                sync(device)
                start = time.perf_counter()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def compare_graph(depth, device, precision, batch, steps, warmup, rounds, compile_mode) -> list[dict]:  # noqa: ANN001
    """Milliseconds per iteration: the graph step inside fit and alone, and the ordinary path's fit, each against
    the hand-written loop with the ordinary path's compilation (CUDA graphs of forward and backward on a GPU).
    Each is the best of `rounds`, alternated; every measurement compiles afresh (minutes for ResNet-110 on a GPU)."""
    graph_compile = "default" if compile_mode is not None else None  # inductor's kernels, captured in the step's

    def stream() -> CifarStream:
        return cifar_stream(device, batch, steps)

    def fit(graph_step: bool) -> float:
        mode = graph_compile if graph_step else compile_mode
        net = CifarResNet(depth)
        return lightning_rate(net, stream(), device, precision, warmup, batch, mode, graph_step=graph_step)

    measures = {
        "graph step inside fit": lambda: fit(True),
        "graph step alone (fixed batch, no Lightning)": lambda: graph_alone_rate(
            depth, device, precision, batch, steps, warmup, graph_compile
        ),
        "ordinary path inside fit": lambda: fit(False),
        "hand-written loop": lambda: raw_rate(
            CifarResNet(depth), stream(), device, precision, warmup, batch, compile_mode
        ),
    }
    ms = {name: 1000 * batch / rate for name, rate in zip(measures, best_of(rounds, *measures.values()), strict=True)}
    reference = ms.pop("hand-written loop")
    return [
        {"figure": f"ms per iteration, CIFAR ResNet-{depth}, batch {batch}, {name}", "ours": value,
         "reference": reference, "unit": "ms", "reference_name": "hand-written loop", "ratio": value / reference}
        for name, value in ms.items()
    ]  # fmt: skip


def compare_resnet50(device, precision, batch, steps, warmup, rounds) -> dict:  # noqa: ANN001
    def rate(make_net) -> float:  # noqa: ANN001
        return raw_rate(make_net(), imagenet_stream(device, batch, steps + warmup), device, precision, warmup, batch)

    ours, reference = best_of(
        rounds, lambda: rate(lambda: ImageNetResNet(50, stride_in_1x1=False)), lambda: rate(torchvision.models.resnet50)
    )
    return {
        "figure": "ResNet-50 forward+backward+SGD",
        "ours": ours,
        "reference": reference,
        "unit": "images/s",
        "reference_name": "torchvision resnet50",
        "ratio": ours / reference,
    }


def compare_pipeline(device, batch, model_rate, workers) -> list[dict]:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    n = 45_000
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    normalize = Standardize(images.float().div(255).mean(0), torch.ones(1))
    device_batches = CifarStream(images.to(device), labels.to(device), batch, normalize)
    for _ in zip(range(5), device_batches, strict=False):
        pass
    sync(device)
    start = time.perf_counter()
    count = sum(len(y) for _, y in device_batches)
    sync(device)
    device_rate = count / (time.perf_counter() - start)

    # The usual pipeline, for reference: torchvision's per-image transforms in DataLoader workers.
    per_image = v2.Compose(
        [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), normalize]
    )
    dataset = PerImage(images, labels, per_image)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    limit = 60
    for i, _ in enumerate(loader):  # start the workers
        if i == 5:
            break
    start, count = time.perf_counter(), 0
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        count += len(y)
        if i == limit:
            break
    sync(device)
    loader_rate = count / (time.perf_counter() - start)
    return [
        {
            "figure": f"CIFAR pipeline: device-resident vs DataLoader ({workers} workers)",
            "ours": device_rate,
            "reference": loader_rate,
            "unit": "images/s",
            "reference_name": "DataLoader + transforms.v2",
            "ratio": device_rate / loader_rate,
        },
        {
            "figure": "CIFAR pipeline: device-resident vs ResNet-20 training",
            "ours": device_rate,
            "reference": model_rate,
            "unit": "images/s",
            "reference_name": "ResNet-20 fit throughput",
            "ratio": device_rate / model_rate,
        },
    ]


MEMORY_SNIPPET = """
import re, sys, torch, torch.nn.functional as F
from resnet_lab import CifarResNet
depth, batch, ckpt, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", torch.device(sys.argv[4])
net = CifarResNet(depth, activation_checkpointing=ckpt).to(device)
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
for _ in range(2):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    F.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
if device.type == "cuda":
    print(torch.cuda.max_memory_allocated(device) / 2**30)
else:  # VmHWM, unlike ru_maxrss, starts afresh at exec: the launching process's size does not leak in
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 2**20)
"""


def peak_memory(depth: int, batch: int, checkpointing: bool, device: torch.device) -> float:
    """GiB: CUDA max allocated in a training step, or the peak RSS of a fresh process doing one on the CPU."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SNIPPET, str(depth), str(batch), str(int(checkpointing)), str(device)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="default: benchmarks/train_speed_<device>.json")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=GROUPS,
        help="only these rows (no JSON written unless --json is given)",
    )
    parser.add_argument("--graph-depths", type=int, nargs="+", default=[20, 110], help="CIFAR depths of the graph rows")
    parser.add_argument("--rounds", type=int, help="alternating rounds per pair (the best kept): 1 on a GPU, 2 on CPU")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of both sides of the fit comparisons; default reduce-overhead (CUDA graphs) on a "
        "GPU, none on a CPU (where compiling takes longer than the benchmark); 'none' turns it off",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    compile_mode = args.compile_mode or ("reduce-overhead" if gpu else "none")
    compile_mode = None if compile_mode == "none" else compile_mode
    precision = "bf16-mixed" if gpu else "32-true"
    if gpu:
        torch.backends.cudnn.benchmark = True
    cifar_batch, cifar_steps, warmup = 128, (300 if gpu else 24), (50 if gpu else 4)
    rounds = args.rounds or (1 if gpu else 2)
    big_batch, big_steps = (128, 40) if gpu else (8, 4)
    rows = []

    def cifar(depth: int) -> dict:
        steps = cifar_steps if depth < 100 else cifar_steps // 2
        return compare_fit(
            f"CIFAR ResNet-{depth}, batch {cifar_batch}",
            lambda: CifarResNet(depth),
            lambda: cifar_stream(device, cifar_batch, steps),
            device,
            precision,
            cifar_batch,
            warmup if depth < 100 else warmup // 2,
            rounds,
            compile_mode,
        )

    only = set(args.only or GROUPS)
    if "cifar" in only:
        rows.append(cifar(20))
    if "cpu_fast" in only and not gpu:
        for depth in (20, 56):
            rows += compare_cpu_fast(depth, cifar_batch, cifar_steps, warmup, rounds)
        if not cpu_has_bf16():
            rows.append(compare_emulated_bf16(cifar_batch))
    if "recipe" in only:
        rows.append(compare_recipe(device, precision, cifar_batch, cifar_steps, warmup, rounds, compile_mode))
    if "cifar" in only:
        rows.append(cifar(110))
    if "graph" in only:
        for depth in args.graph_depths:
            steps = cifar_steps if depth < 100 else cifar_steps // 2
            rows += compare_graph(depth, device, precision, cifar_batch, steps, warmup, rounds, compile_mode)
    if "overhead" in only:
        rows.append(compare_overhead(device, precision, rounds))
    if "resnet50" in only:
        rows.append(
            compare_fit(
                f"ImageNet ResNet-50, batch {big_batch}, synthetic",
                lambda: ImageNetResNet(50),
                lambda: imagenet_stream(device, big_batch, big_steps + 2),
                device,
                precision,
                big_batch,
                2,
                rounds,
                # Uncompiled: a step this long is bound by the GPU, not the host, and compiling it takes minutes.
                None,
            )
        )
        rows.append(compare_resnet50(device, precision, big_batch, big_steps, 2, rounds))
    if "pipeline" in only:
        model_rate = rows[0]["ours"] if "cifar" in only else compare_fit(
            "", lambda: CifarResNet(20), lambda: cifar_stream(device, cifar_batch, cifar_steps), device, precision,
            cifar_batch, warmup, 1, compile_mode)["ours"]  # fmt: skip
        rows += compare_pipeline(device, cifar_batch, model_rate, workers=min(8, os.cpu_count() or 1))
    if "memory" in only and not args.skip_memory:
        for depth, batch in ((110, 128), (1202, 128 if gpu else 32)):
            plain, ckpt = peak_memory(depth, batch, False, device), peak_memory(depth, batch, True, device)
            rows.append(
                {
                    "figure": f"peak memory, ResNet-{depth} training step, batch {batch}",
                    "ours": ckpt,
                    "reference": plain,
                    "unit": "GiB " + ("CUDA max allocated" if gpu else "peak RSS"),
                    "reference_name": "without checkpointing",
                    "ratio": ckpt / plain,
                }
            )

    meta = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device)
        if gpu
        else f"CPU ({os.cpu_count()} cores, {cpu_info()[0]}, {torch.backends.cpu.get_cpu_capability()}"
        f"{', bf16' if cpu_has_bf16() else ''})",
        "precision": precision,
        "torch": torch.__version__,
        "lightning": L.__version__,
        # A copy of the working tree on a GPU machine may come without its .git: the caller then names the commit.
        "commit": os.environ.get("RESNET_LAB_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip(),
    }
    print(
        f"\n{meta['device']}, {precision}, torch {meta['torch']}, lightning {meta['lightning']}, "
        f"commit {meta['commit']}, {meta['date']}\n"
    )
    print("| figure | ours | reference | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        digits = 2 if r["unit"] == "ms" else 1 if "GiB" in r["unit"] or r["ours"] < 100 else 0
        ours, ref = f"{r['ours']:,.{digits}f}", f"{r['reference']:,.{digits}f}"
        print(f"| {r['figure']} | {ours} {r['unit']} | {ref} ({r['reference_name']}) | {r['ratio']:.2f}x |")
    if args.json or not args.only:
        out = Path(args.json or Path(__file__).parent / f"train_speed_{device.type}.json")
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
