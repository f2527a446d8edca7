"""What every data module here shares: where data lives, in-memory image datasets, and the loaders."""

import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from resnet_lab.errors import ConfigError

DATA_ENV = "RESNET_LAB_DATA"


def resolve_root(root: str | Path | None) -> Path:
    """`root` if given, else `$RESNET_LAB_DATA`, else `./data`."""
    return Path(root if root is not None else os.environ.get(DATA_ENV, "data")).expanduser()


def run_seed() -> int:
    """The run's seed (`seed_everything`, which Lightning keeps in PL_GLOBAL_SEED; 0 if unset)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)


class Standardize(nn.Module):
    """(x - mean) / std with broadcasting, so `mean` can be a per-pixel image (the paper's CIFAR input)."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def fit_standardize(images: Tensor, per_pixel: bool) -> Standardize:
    """Statistics of uint8 images [N, C, H, W] scaled to [0, 1]: the per-pixel mean image alone (the paper's
    CIFAR input), or the per-channel mean and std."""
    x = images.float().div_(255)
    if per_pixel:
        return Standardize(x.mean(dim=0), torch.ones(1))
    return Standardize(x.mean(dim=(0, 2, 3))[:, None, None], x.std(dim=(0, 2, 3))[:, None, None])


def split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random train / validation split of range(n)."""
    if not 0 <= val_size < n:
        raise ConfigError(f"val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


class RepeatedAugmentationSampler(DistributedSampler):
    """Repeated augmentation (Hoffer et al. 2020), as torchvision's ResNet-50 recipe trains with it: each epoch
    draws a seeded permutation, repeats every image `repetitions` times and deals the copies out over the processes
    (so one image's copies are augmented on different processes), and each process keeps the first
    `len(dataset) // 256 * 256 // world_size` of its share, so an epoch stays about one pass of images.

    torchvision keeps its `RASampler` in its training references, not in the library; this follows it. A
    `DistributedSampler`, so that Lightning does not wrap it in one of its own.

    Args:
        size: images in the split.
        repetitions: copies of each drawn image per epoch (4 in torchvision's recipe).
        seed: the permutation of epoch e uses seed + e.
        rank, world_size: this process's share.
    """

    def __init__(self, size: int, repetitions: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.repetitions, self.seed = size, repetitions, seed
        self.rank, self.num_replicas, self.epoch, self.shuffle, self.drop_last = rank, world_size, 0, True, True
        self.total_size = -(-size * repetitions // world_size) * world_size
        self.num_samples = size // 256 * 256 // world_size if size >= 256 else max(1, size // world_size)

    def __iter__(self):  # noqa: ANN204
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).repeat_interleave(self.repetitions).tolist()
        order += order[: self.total_size - len(order)]  # as many for every process
        return iter(order[self.rank : self.total_size : self.num_replicas][: self.num_samples])

    def __len__(self) -> int:
        return self.num_samples


class ClassificationDataModule(L.LightningDataModule):
    """Builds the loaders from `train_set`, `val_set` and `test_set`, which subclasses fill in `setup`.

    Args:
        batch_size: the global batch, split evenly over all processes (devices x nodes).
        num_workers: loader processes; None follows the machine.
    """

    num_classes: int
    input_size: int  # height and width of the training images

    def __init__(self, batch_size: int, num_workers: int | None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(
                f"--data.num_workers must be 0 (load in the training process) or more, got {num_workers}; leave it "
                "unset to follow the machine"
            )
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def process_batch_size(self) -> int:
        """This process's share of the global `batch_size`."""
        return self.batch_share(self.trainer.world_size if self.trainer is not None else 1)

    def batch_share(self, processes: int) -> int:
        """Each of `processes` processes' share of the global `batch_size`; refused unless it splits evenly."""
        if self.batch_size % processes:
            nearest = max(processes, round(self.batch_size / processes) * processes)
            raise ConfigError(
                f"batch_size {self.batch_size} is the global batch and must split evenly over the {processes} "
                f"processes (devices x nodes); use a multiple of {processes}, e.g. --data.batch_size {nearest}"
            )
        return self.batch_size // processes

    def eval_collate_fn(self) -> Callable | None:
        """How evaluation samples form a batch; None stacks them."""
        return None

    def _share(self) -> tuple[int, int]:
        """This process's (rank, world size) under data parallelism."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def train_sampler(self, dataset: Dataset) -> DistributedSampler | None:
        """The training sampler; None: Lightning's own (shuffled, and split over the processes)."""
        return None

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split")
        sampler = self.train_sampler(dataset) if train else None
        if train and self.num_workers == 0 and self.trainer is not None and self.trainer.world_size > 1:
            # Without workers the transforms draw from this process's global RNG, seeded alike on every process:
            # give each its own stream, or the i-th image of every share would get the same crop and flip.
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=self.process_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            collate_fn=None if train else self.eval_collate_fn(),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
