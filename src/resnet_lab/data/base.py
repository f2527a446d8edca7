"""What every data module here shares: where data lives, the loaders, and the batches' augmentation on the device."""

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from resnet_lab.data.augmentations import (
    KEYED_AT_TRANSFER,
    BatchAugmentation,
    BatchTransforms,
    MixBatch,
    Standardize,
    batch_key,
    checked_augmentations,
)
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
    """Builds the loaders from `train_set`, `val_set` and `test_set`, which subclasses fill in `setup`, and
    transforms every batch once it is on the device (`on_after_batch_transfer`): the loaders hand over uint8 images,
    their labels and the batch's key; `BatchTransforms` applies the data's own augmentations
    (`data_augmentations`, e.g. ImageNet's PCA colour noise), then `augmentations`, then the normalisation
    (`normalize`, which subclasses set), then `mixing`.

    Args:
        batch_size: the global batch, split evenly over all processes (devices x nodes).
        num_workers: loader processes; None follows the machine.
        augmentations: applied in order to every training batch, on the device.
        mixing: mixes every training batch and its labels after the normalisation (`MixBatch`); None for none.
    """

    num_classes: int
    input_size: int  # height and width of the training images
    normalize: Standardize

    def __init__(
        self,
        batch_size: int,
        num_workers: int | None,
        augmentations: Sequence[BatchAugmentation] = (),
        mixing: MixBatch | None = None,
    ) -> None:
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
        self.augmentations = checked_augmentations(augmentations)
        self.mixing = mixing
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._transforms: BatchTransforms | None = None
        self._last_transfer = (-1, -1, 0)  # (epoch, global step, batches keyed at it): see `key_at_transfer`

    def data_augmentations(self) -> list[BatchAugmentation]:
        """Augmentations the data module itself brings, applied before `augmentations`; none by default."""
        return []

    @property
    def batch_transforms(self) -> BatchTransforms:
        """What `on_after_batch_transfer` applies; built once `normalize` is known (in `setup`, for most)."""
        if self._transforms is None or self._transforms.normalize is not self.normalize:
            augmentations = [*self.data_augmentations(), *self.augmentations]
            self._transforms = BatchTransforms(augmentations, self.normalize, self.num_classes, self.mixing)
        return self._transforms

    def key_at_transfer(self) -> int:
        """The key of a training batch whose loader could not know it (`KEYED_AT_TRANSFER`): from (the run's seed,
        epoch, iteration), and the micro-batch within an iteration that accumulates gradients.

        The same under data parallelism, and after a resume at an iteration's end; but the DataLoader path does not
        resume mid-epoch with the very images it would have had: its order and workers' crops restart with the epoch.
        """
        trainer = self.trainer
        epoch, step = (trainer.current_epoch, trainer.global_step) if trainer is not None else (0, 0)
        last_epoch, last_step, count = self._last_transfer
        count = count + 1 if (last_epoch, last_step) == (epoch, step) else 0
        self._last_transfer = (epoch, step, count)
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        return batch_key(run_seed(), epoch, step * accumulate + count)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning also passes the model's example input through here (for the graph and the summary): only this
        # module's own (uint8 images, labels, key) batches are transformed.
        if not (isinstance(batch, tuple | list) and len(batch) == 3 and isinstance(batch[2], int)):
            return batch
        images, labels, key = batch
        if key == KEYED_AT_TRANSFER:
            key = self.key_at_transfer()
        images, labels = self.batch_transforms(images, labels, key, *self._share())
        # Lightning converts a batch to the precision's input type (64-true, bf16-true, ...) before this hook, when
        # these images were still uint8.
        return self.trainer.precision_plugin.convert_input((images, labels)) if self.trainer else (images, labels)

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

    def collate_fn(self, train: bool) -> Callable | None:
        """How a loader's samples form a batch; None stacks them."""
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
            collate_fn=self.collate_fn(train),
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
