"""Data-parallel training, launched with torchrun exactly as a user would: 2 CPU processes (gloo) against 1 process.

Every image of the small on-disk CIFAR carries its index in channel 0 (a constant plane), so the index can be read
back from the centre pixel of any crop or mirror of it; channels 1 and 2 are noise, so the crop window and the
mirroring of each training image can be recovered exactly. A test-only callback, written next to the runs and
added with `--trainer.callbacks+=`, records every training batch each process trains on.

`--trainer.sync_batchnorm true` cannot run here: torch's DDP refuses SyncBatchNorm on CPU ("SyncBatchNorm layers
only work with GPU modules"). Each process therefore normalises its own share of the batch, and the two runs'
weights are not expected to agree with each other. What is compared instead, exactly:
- the data: at every iteration the processes' batches together are the single process's batch, crops and mirrors
  included;
- the weights: each run's last.ckpt against a replay of the batches its processes trained on (one shared model,
  per-process BN statistics, the mean of the processes' losses: what DDP computes). With one process this is the
  single run; with BN statistics over the global batch (sync BN) it would be the single run too.
"""

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, REPO, subprocess_env, write_cifar_batch
from resnet_lab.models import CifarResNet

pytestmark = pytest.mark.slow  # data-parallel processes

PROCESSES = 2
GLOBAL_BATCH = 16
VAL_SIZE = 72
TRAIN_SIZE = 200 - VAL_SIZE
STEPS_PER_EPOCH = TRAIN_SIZE // GLOBAL_BATCH  # 8
MAX_STEPS = 10  # crosses into the second epoch: its reshuffle must agree across processes too
DEPTH = 8
# lr 0.02 instead of the paper's 0.1: on noise images with random labels, lr 0.1 makes training so chaotic that a
# float32 rounding difference of 1e-7 grows to 1e-3 in 10 iterations; at 0.02 a 2-thread replay of the same
# batches stays within 1e-7 of a 1-thread one, while a wrong share of the batch moves them by 1e-2 or more.
LR = 0.02
# Weights vs a replay of the same batches on one CPU thread, like the runs: bit for bit here (max abs difference
# measured: 0.0 for all three runs, and for the sync-BN comparison with the single run). 1e-5 allows for another
# CPU kernel or reduction order; the negative control below (BN statistics shared differently) differs by 1.2e-2
# to 1.7e-2.
WEIGHT_ATOL = 1e-5

PROBE = '''
"""Test-only: records what this process trains on."""

from pathlib import Path

import torch
from lightning.pytorch import Callback


class RecordBatches(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.record = {"inputs": [], "images": [], "labels": [], "steps": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.record["initial"] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        inputs, labels = batch
        norm = trainer.datamodule.normalize  # back to the uint8 pixels, to read each image's index and crop
        pixels = (inputs * norm.std.to(inputs.device) + norm.mean.to(inputs.device)) * 255
        self.record["inputs"].append(inputs.detach().cpu().clone())
        self.record["images"].append(pixels.round().clamp(0, 255).to(torch.uint8).cpu())
        self.record["labels"].append(labels.cpu().clone())
        self.record["steps"].append(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["world_size"] = trainer.world_size
        self.record["final"] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(self.record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")
'''


@dataclass
class Run:
    ranks: list[dict]  # one record per process, by global rank
    checkpoint: dict  # last.ckpt


def write_tagged_cifar(root: Path) -> torch.Tensor:
    """CIFAR-10 files of 5 x 40 training images whose channel 0 is the image's index; returns the images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    for i, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        images = rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
        images[:, 0] = (40 * i + np.arange(40))[:, None, None] % 256
        write_cifar_batch(folder / name, images, [int(x) for x in rng.integers(0, 10, 40)])
        train.append(images)
    return torch.from_numpy(np.concatenate(train[:5]))


def start(out: Path, work: Path, processes: int, args: list[str]) -> subprocess.Popen:
    """`python main.py fit *args` in `out`, under torchrun with `processes` CPU processes (gloo) if more than one,
    its output in out/output.txt; `work` (where the probes are written) is on the path."""
    command = [
        *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []),
        str(REPO / "main.py"),
        "fit",
        *args,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(processes),
        *(["--trainer.strategy", "ddp"] if processes > 1 else []),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(out / "logs"),
        "--trainer.logger.init_args.log_graph",  # tracing the graph costs each run ~2 s and tests nothing here
        "false",
    ]
    # OMP_NUM_THREADS: what torchrun gives each process; the single run and the replay use it too.
    env = {**subprocess_env(REPO / "src", work), "OMP_NUM_THREADS": "1"}
    env.pop("RESNET_LAB_DATA", None)
    with (out / "output.txt").open("w") as log:
        return subprocess.Popen([sys.executable, *command], cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, out: Path) -> None:
    """Wait for a run started by `start`; its output's tail if it failed."""
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert code == 0, (out / "output.txt").read_text()[-4000:]


def launch(name: str, root: Path, work: Path, processes: int, *extra: str) -> tuple[subprocess.Popen, Path]:
    out = work / name
    out.mkdir()
    args = [
        "--config",
        str(CONFIGS / "resnet20_cifar.yaml"),
        "--data.root",
        str(root),
        "--data.batch_size",
        str(GLOBAL_BATCH),
        "--data.val_size",
        str(VAL_SIZE),
        "--model.backbone.init_args.depth",
        str(DEPTH),
        "--model.optimizer.init_args.lr",
        str(LR),
        "--trainer.max_steps",
        str(MAX_STEPS),
        "--trainer.deterministic",
        "true",
        "--trainer.callbacks+=ddp_probe.RecordBatches",
        "--trainer.callbacks.out_dir",
        str(out),
        *extra,
    ]
    return start(out, work, processes, args), out


def collect(proc: subprocess.Popen, out: Path, processes: int) -> Run:
    finish(proc, out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(processes)]
    checkpoint = torch.load(
        out / "logs" / "resnet20_cifar" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False
    )
    return Run(ranks, checkpoint)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process, 2 processes on the device-resident loader (the default), 2 on the DataLoader path; launched
    together (each process has one thread) and each trained for MAX_STEPS iterations."""
    work = tmp_path_factory.mktemp("distributed")
    (work / "ddp_probe.py").write_text(PROBE)
    train_images = write_tagged_cifar(work / "data")
    # num_workers 0: the batches are gathered in the training process (the workers' path is test_resume.py's).
    dataloader = ("--data.loader", "dataloader", "--data.num_workers", "0")
    launched = {
        "single": (launch("single", work / "data", work, 1), 1),
        "ddp": (launch("ddp", work / "data", work, PROCESSES), PROCESSES),
        "ddp_dataloader": (launch("ddp_dataloader", work / "data", work, PROCESSES, *dataloader), PROCESSES),
    }
    try:
        results = {name: collect(proc, out, processes) for name, ((proc, out), processes) in launched.items()}
    finally:
        for (proc, _), _ in launched.values():
            if proc.poll() is None:
                proc.kill()
    return {"train_images": train_images, **results}


def image_ids(images: torch.Tensor) -> torch.Tensor:
    """The index of each recorded image: its channel-0 plane, read at the centre (inside every crop window)."""
    return images[:, 0, 16, 16].long()


def crops_and_flips(images: torch.Tensor, sources: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """[B, 3]: the (row, column) offset of each image's window in its zero-padded source, and whether it is
    mirrored, found by matching the noise channels against every window and mirror."""
    size = images.shape[-1]
    windows = F.pad(sources[:, 1:], (padding,) * 4).unfold(2, size, 1).unfold(3, size, 1)  # B, 2, 9, 9, H, W
    found = []
    for flip in (False, True):
        target = images[:, 1:].flip(-1) if flip else images[:, 1:]
        found.append((windows == target[:, :, None, None]).all(dim=(1, 4, 5)))  # B, 9, 9
    match = torch.stack(found, dim=-1).nonzero()  # (image, row, column, mirrored)
    assert torch.equal(match[:, 0], torch.arange(len(images))), "a recorded image matches no window of its source"
    return match[:, 1:]


def per_step(record: dict, key: str) -> list[torch.Tensor]:
    assert record["steps"] == list(range(MAX_STEPS))
    return record[key]


def check_shards(run: Run) -> list[list[torch.Tensor]]:
    """Each process trains on its own share of every global batch, and an epoch covers the train split once.
    Returns the image indices per step and process."""
    assert [r["world_size"] for r in run.ranks] == [PROCESSES] * PROCESSES
    ids = [[image_ids(images) for images in per_step(r, "images")] for r in run.ranks]
    for step in range(MAX_STEPS):
        shares = [ids[rank][step] for rank in range(PROCESSES)]
        assert [len(s) for s in shares] == [GLOBAL_BATCH // PROCESSES] * PROCESSES, f"step {step}"
        together = torch.cat(shares)
        assert len(together.unique()) == GLOBAL_BATCH, f"step {step}: processes share images: {shares}"
    for epoch_steps in (range(STEPS_PER_EPOCH), range(STEPS_PER_EPOCH, MAX_STEPS)):
        seen = torch.cat([ids[rank][step] for step in epoch_steps for rank in range(PROCESSES)])
        assert len(seen.unique()) == len(seen), "an image came twice within one epoch"
    first_epoch = torch.cat([ids[rank][step] for step in range(STEPS_PER_EPOCH) for rank in range(PROCESSES)])
    assert len(first_epoch) == TRAIN_SIZE
    second_epoch_start = torch.cat([ids[rank][STEPS_PER_EPOCH] for rank in range(PROCESSES)])
    assert set(second_epoch_start.tolist()) != set(torch.cat([ids[r][0] for r in range(PROCESSES)]).tolist())
    return ids


def test_device_loader_splits_each_global_batch_and_its_augmentation_over_the_processes(runs):
    single, ddp = runs["single"], runs["ddp"]
    check_shards(ddp)
    for step in range(MAX_STEPS):
        one = (per_step(single.ranks[0], "images")[step], single.ranks[0]["labels"][step])
        one_inputs = single.ranks[0]["inputs"][step]
        many = [torch.cat([r[key][step] for r in ddp.ranks]) for key in ("images", "labels", "inputs")]
        # The same images with the same crops, mirrors, labels and normalised values, whichever order.
        mine, theirs = image_ids(many[0]).argsort(), image_ids(one[0]).argsort()
        assert torch.equal(many[0][mine], one[0][theirs]), f"step {step}: images or their augmentation differ"
        assert torch.equal(many[1][mine], one[1][theirs]), f"step {step}: labels differ"
        assert torch.equal(many[2][mine], one_inputs[theirs]), f"step {step}: normalised inputs differ"
    # The augmentation really ran: windows all over the padded image, about half of them mirrored.
    images = torch.cat(single.ranks[0]["images"])
    draws = crops_and_flips(images, runs["train_images"][image_ids(images)])
    assert len(draws[:, :2].unique(dim=0)) > 20 and 0.2 < draws[:, 2].float().mean() < 0.8


def test_dataloader_path_gives_each_process_the_very_batches_of_the_device_path(runs):
    run = runs["ddp_dataloader"]
    check_shards(run)
    # The same batch order and the same augmentation draws, applied in the same place (on_after_batch_transfer):
    # only where the split waits between batches differs.
    for on_host, on_device in zip(run.ranks, runs["ddp"].ranks, strict=True):
        for a, b in zip(per_step(on_host, "images"), per_step(on_device, "images"), strict=True):
            assert torch.equal(a, b)


def replay(initial: dict, shares: list[tuple[list, list]], checkpoint: dict, steps: int) -> dict:
    """What one SGD model becomes on these batches when each share is normalised by its own BN statistics and
    the gradient is that of the mean of the shares' losses: DDP without sync BN; one share: a single process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = CifarResNet(depth=DEPTH, num_classes=10)
        model.load_state_dict({k.removeprefix("backbone."): v for k, v in initial.items()})
        model.train()
        group = checkpoint["optimizer_states"][0]["param_groups"][0]
        # The schedule's first milestone (32k) lies far beyond MAX_STEPS: the lr stays at its initial value.
        assert group["lr"] == group["initial_lr"] == LR
        optimizer = torch.optim.SGD(
            model.parameters(), lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"]
        )
        for step in range(steps):
            optimizer.zero_grad()
            loss = sum(F.cross_entropy(model(inputs[step]), labels[step]) for inputs, labels in shares) / len(shares)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return {f"backbone.{name}": p.detach() for name, p in model.named_parameters()}


def max_difference(params: dict, state_dict: dict) -> float:
    return max((p - state_dict[name]).abs().max().item() for name, p in params.items())


def parameters(state_dict: dict) -> dict:
    """Weights and biases; not BN running statistics, which without sync BN each process keeps for itself."""
    return {k: v for k, v in state_dict.items() if k.endswith((".weight", ".bias"))}


@pytest.mark.parametrize("name", ["single", "ddp", "ddp_dataloader"])
def test_last_checkpoint_holds_the_weights_of_the_batches_the_processes_trained_on(runs, name):
    run = runs[name]
    checkpoint, state = run.checkpoint, run.checkpoint["state_dict"]
    assert checkpoint["global_step"] == MAX_STEPS
    for record in run.ranks:  # DDP: every process starts from and ends with the same weights, those saved
        assert max_difference(parameters(record["initial"]), run.ranks[0]["initial"]) == 0
        assert max_difference(parameters(record["final"]), state) == 0
    shares = [(r["inputs"], r["labels"]) for r in run.ranks]
    replayed = replay(run.ranks[0]["initial"], shares, checkpoint, MAX_STEPS)
    assert max_difference(replayed, state) <= WEIGHT_ATOL
    if len(shares) > 1:
        # Negative control: BN statistics over the whole global batch (what sync BN computes) give other weights,
        # by far more than the tolerance: the comparison above sees how the batch was split.
        whole = [torch.cat(step) for step in zip(*(inputs for inputs, _ in shares), strict=True)]
        labels = [torch.cat(step) for step in zip(*(labels for _, labels in shares), strict=True)]
        other = replay(run.ranks[0]["initial"], [(whole, labels)], checkpoint, MAX_STEPS)
        assert max_difference(other, state) > 100 * WEIGHT_ATOL


def test_ddp_with_bn_over_the_global_batch_gives_the_single_process_weights(runs):
    # The weights 2 processes with sync BN reach on these shares (BN statistics over the whole global batch) are
    # the single run's last.ckpt. Rank r holds images r, r + 2, ... of each global batch: interleaved back, the
    # batches are the single run's in its own order, so not even float rounding differs (measured: 0.0; a different
    # order within the batch leaves ~1e-7 after BN, which 10 chaotic iterations can grow to ~1e-4).
    ddp, single = runs["ddp"], runs["single"]
    whole = [torch.stack(step, dim=1).flatten(0, 1) for step in zip(*(r["inputs"] for r in ddp.ranks), strict=True)]
    labels = [torch.stack(step, dim=1).flatten(0, 1) for step in zip(*(r["labels"] for r in ddp.ranks), strict=True)]
    synced = replay(ddp.ranks[0]["initial"], [(whole, labels)], ddp.checkpoint, MAX_STEPS)
    assert max_difference(synced, single.checkpoint["state_dict"]) <= WEIGHT_ATOL


# Repeated augmentation (torchvision's ResNet-50 recipe) over 2 real processes: ImageNet's loader path, the
# recipe's own config with what would hide the images turned off (mixing, TrivialAugment, random erasing). Every
# image is one flat colour whose red channel names its index in the ImageFolder order, so the index can be read
# back from any crop, resize or mirror of it; PNG, so that no compression moves the colour.
RA_CLASSES = 3
RA_PER_CLASS = 8
RA_IMAGES = RA_CLASSES * RA_PER_CLASS  # 24: under 256, so each process keeps len // 2 = 12 copies an epoch
RA_REPETITIONS = 3  # not the recipe's 4: over 2 processes 4 give both the same list, which hides a wrong rank
RA_BATCH = 8  # global: 4 per process, 3 iterations an epoch
RA_STEPS = 6  # two epochs: the second's order must be a new one, alike on both processes
RA_SEED = 0  # the recipe's seed_everything, which the sampler takes its permutations from

RA_PROBE = '''
"""Test-only: records the training sampler each process iterates, and the images it trains on."""

from pathlib import Path

import torch
from lightning.pytorch import Callback

from resnet_lab.data.imagenet import IMAGENET_MEAN, IMAGENET_STD


class RecordSampler(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.record = {"epochs": [], "pixels": [], "labels": [], "steps": []}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        sampler = loader.sampler
        self.record["epochs"].append({
            "class": f"{type(sampler).__module__}.{type(sampler).__qualname__}",
            "whole_batches": loader.batch_sampler is None,
            "rank": sampler.rank,
            "num_replicas": sampler.num_replicas,
            "seed": sampler.seed,
            "epoch": sampler.epoch,
            "order": [i for _, batch in sampler for i in batch.tolist()],
            "samples": [(Path(path).name, target) for path, target in loader.dataset.dataset.samples],
        })

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        inputs, labels = batch
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        self.record["pixels"].append(((inputs.cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8))
        self.record["labels"].append(labels.cpu().clone())
        self.record["steps"].append((trainer.current_epoch, batch_idx, trainer.global_step))

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["global_rank"], self.record["world_size"] = trainer.global_rank, trainer.world_size
        torch.save(self.record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")
'''


def red(index: int) -> int:
    """The red level that names image `index`: 8 levels apart, so a resampling's rounding cannot move it to another."""
    return 8 * index + 4


def write_flat_image_folder(root: Path) -> None:
    """root/train and root/val in the ImageFolder layout; train image k (ImageFolder order) is flat red(k)."""
    from torchvision.io import write_png

    for split, count in (("train", RA_PER_CLASS), ("val", 2)):
        for c in range(RA_CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                index = c * count + i
                image = torch.tensor([red(index), 128, 64], dtype=torch.uint8)[:, None, None].expand(3, 40, 48)
                write_png(image.contiguous(), str(folder / f"{index:02d}.png"))


def test_repeated_augmentation_under_ddp_deals_each_image_s_copies_to_both_processes(tmp_path):
    from resnet_lab.data.base import RepeatedAugmentationSampler

    (tmp_path / "ra_probe.py").write_text(RA_PROBE)
    write_flat_image_folder(tmp_path / "imagenet")
    out = tmp_path / "run"
    out.mkdir()
    args = ["--config", str(CONFIGS / "resnet50_imagenet_tv2.yaml"), "--data.root", str(tmp_path / "imagenet"),
            "--data.repeated_augmentations", str(RA_REPETITIONS), "--data.batch_size", str(RA_BATCH),
            "--data.num_workers", "0", "--data.crop_size", "32", "--data.eval_crop_size", "32",
            "--data.val_resize", "32", "--data.mixing", "null",
            "--data.train_augmentation.init_args.trivial_augment", "false",
            "--data.train_augmentation.init_args.erasing_p", "0",
            "--model.backbone.init_args.depth", "18", "--model.lr_scheduler.init_args.warmup_steps", "1",
            "--trainer.max_steps", str(RA_STEPS), "--trainer.num_sanity_val_steps", "0",
            "--trainer.callbacks+=ra_probe.RecordSampler", "--trainer.callbacks.out_dir", str(out)]  # fmt: skip
    finish(start(out, tmp_path, PROCESSES, args), out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(PROCESSES)]

    per_process = RA_IMAGES // PROCESSES
    steps_per_epoch = per_process // (RA_BATCH // PROCESSES)
    epochs = RA_STEPS // steps_per_epoch
    for rank, record in enumerate(ranks):
        assert (record["global_rank"], record["world_size"]) == (rank, PROCESSES)
        for epoch, seen in enumerate(record["epochs"]):
            # Lightning kept our sampler (a DistributedSampler, so not wrapped in its own) and moved it on to
            # each epoch; it was built with this process's real share of the run.
            assert seen["class"] == "resnet_lab.data.base.RepeatedAugmentationSampler"
            assert seen["whole_batches"]  # the sampler names whole batches
            share = (seen["rank"], seen["num_replicas"], seen["seed"], seen["epoch"])
            assert share == (rank, PROCESSES, RA_SEED, epoch)
            # ImageFolder's order is the files' order: the dataset's index k is the image whose red names k.
            assert seen["samples"] == [(f"{k:02d}.png", k // RA_PER_CLASS) for k in range(RA_IMAGES)]
            batch = RA_BATCH // PROCESSES
            expected = RepeatedAugmentationSampler(RA_IMAGES, batch, RA_REPETITIONS, RA_SEED, rank, PROCESSES)
            expected.set_epoch(epoch)
            order = [i for _, indices in expected for i in indices.tolist()]
            assert seen["order"] == order and len(seen["order"]) == per_process
        assert len(record["epochs"]) == epochs
        assert record["steps"] == [(s // steps_per_epoch, s % steps_per_epoch, s) for s in range(RA_STEPS)]

    # What each process trained on, image by image: the images its share of the sampler's order names, in order,
    # with their folders' labels.
    trained = {}  # (epoch, rank) -> the dataset indices of the images trained on
    for rank, record in enumerate(ranks):
        for (epoch, _, _), pixels, labels in zip(record["steps"], record["pixels"], record["labels"], strict=True):
            planes = pixels.flatten(2)
            assert (planes.amax(2) - planes.amin(2) <= 2).all()  # each crop is still one flat colour
            assert (planes[:, 1:].float().mean(2) - torch.tensor([128.0, 64.0])).abs().max() <= 2
            indices = ((planes[:, 0].float().mean(1) - 4) / 8).round().long()
            assert torch.equal(labels, indices // RA_PER_CLASS)  # the dataset's target of each image
            trained.setdefault((epoch, rank), []).extend(indices.tolist())
    for epoch in range(epochs):
        for rank in range(PROCESSES):
            assert trained[epoch, rank] == ranks[rank]["epochs"][epoch]["order"], f"epoch {epoch}, rank {rank}"
        # Across the processes an epoch draws RA_IMAGES // RA_REPETITIONS images, each RA_REPETITIONS times,
        # and every drawn image is augmented on both processes.
        copies = Counter(trained[epoch, 0] + trained[epoch, 1])
        assert len(copies) == RA_IMAGES // RA_REPETITIONS and set(copies.values()) == {RA_REPETITIONS}
        assert set(trained[epoch, 0]) == set(trained[epoch, 1]) == set(copies)
    assert set(trained[0, 0]) != set(trained[1, 0])  # the second epoch draws other images


ELASTIC_PROBE = '''
"""Test-only: paces training, says where each process is, and records the batches it trains on."""

import os
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback


class Elastic(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out = Path(out_dir)
        self.record = {}  # global step -> the normalised inputs and labels this process trained on

    def name(self, trainer, what: str) -> Path:
        return self.out / f"{what}-rank{trainer.global_rank}-restart{os.environ['TORCHELASTIC_RESTART_COUNT']}"

    def on_train_start(self, trainer, pl_module) -> None:
        self.name(trainer, "pid").write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record[trainer.global_step] = [t.detach().cpu().clone() for t in batch]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.name(trainer, "step").write_text(str(trainer.global_step))
        time.sleep(0.3)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.record, self.name(trainer, "batches"))
'''
ELASTIC_STEPS = 25  # 160 images in global batches of 16: 10 iterations per epoch
ELASTIC_CHECKPOINT = 3  # --periodic_checkpoint.every_n_train_steps


def torchrun_train(out: Path, work: Path, max_restarts: int) -> subprocess.Popen:
    """scripts/torchrun_train.sh under torchrun's elastic agent, 2 CPU processes, each with 2 loader workers, on the
    ImageNet-layout folder work/imagenet, run in `out`."""
    out.mkdir()
    command = [
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES)),
        *("--max-restarts", str(max_restarts), "--monitor-interval", "0.5", "--no-python"),
        str(REPO / "scripts" / "torchrun_train.sh"),
        str(CONFIGS / "resnet18_imagenette.yaml"),
        *("--data.root", str(work / "imagenet"), "--data.batch_size", "16", "--data.num_workers", "2"),
        *("--data.crop_size", "32", "--data.val_resize", "36", "--data.test_scales", "[32]"),
        *("--data.train_augmentation.init_args.scale_range", "[36,48]"),
        *("--trainer.accelerator", "cpu", "--trainer.devices", str(PROCESSES), "--trainer.strategy", "ddp"),
        *("--trainer.max_steps", str(ELASTIC_STEPS), "--trainer.deterministic", "true"),
        *("--periodic_checkpoint.every_n_train_steps", str(ELASTIC_CHECKPOINT)),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
        *("--trainer.logger.init_args.log_graph", "false"),
        *("--trainer.callbacks+=elastic_probe.Elastic", "--trainer.callbacks.out_dir", str(out)),
    ]
    env = {**subprocess_env(REPO / "src", work), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # as docs/distributed.md prescribes
    env.pop("RESNET_LAB_DATA", None)
    with (out / "output.txt").open("w") as log:
        return subprocess.Popen([sys.executable, *command], cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)


def elastic_run(out: Path) -> Path:
    [folder] = (out / "logs" / "torchrun").glob("*/resnet18_imagenette/version_*")
    return folder


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_as_if_never_stopped(tmp_path):
    """torchrun --max-restarts 1 with scripts/torchrun_train.sh: rank 1 is SIGKILLed mid-epoch; the agent restarts
    both processes, which resume from the run's last.ckpt in the same run folder. Each rank then trains on exactly
    its share of the batches of the run never stopped (DataLoader workers, ImageNet layout), and the run ends with
    its weights, bit for bit: a crash costs only the iterations since the last checkpoint, trained again."""
    import os
    import signal
    import time

    from conftest import write_tiny_imagenet

    work = tmp_path
    (work / "elastic_probe.py").write_text(ELASTIC_PROBE)
    write_tiny_imagenet(work, train_per_class=40, val_per_class=3, classes=4)
    reference = torchrun_train(work / "reference", work, max_restarts=0)
    finish(reference, work / "reference")

    out = work / "killed"
    killed = torchrun_train(out, work, max_restarts=1)
    deadline = time.monotonic() + 300
    step = out / "step-rank1-restart0"
    while not (step.exists() and step.read_text() and int(step.read_text()) >= 14):  # epoch 1, after iteration 12's
        assert killed.poll() is None and time.monotonic() < deadline, (out / "output.txt").read_text()[-4000:]
        time.sleep(0.1)
    os.kill(int((out / "pid-rank1-restart0").read_text()), signal.SIGKILL)
    finish(killed, out)
    output = (out / "output.txt").read_text()
    assert "restart 1: resuming the run under logs/torchrun/" in output, output[-4000:]

    run = elastic_run(out)
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # the same run went on
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    expected = torch.load(elastic_run(work / "reference") / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == expected["global_step"] == ELASTIC_STEPS
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, saved["state_dict"][key]), key
    for rank in range(PROCESSES):
        before = torch.load(work / "reference" / f"batches-rank{rank}-restart0", weights_only=False)
        after = torch.load(out / f"batches-rank{rank}-restart1", weights_only=False)
        resumed_at = min(after)  # the last checkpoint before the kill: what the crash cost
        assert 12 <= resumed_at <= 15 and resumed_at % ELASTIC_CHECKPOINT == 0
        assert sorted(after) == list(range(resumed_at, ELASTIC_STEPS))
        for step_, (inputs, labels) in after.items():
            assert torch.equal(inputs, before[step_][0]) and torch.equal(labels, before[step_][1]), (rank, step_)
