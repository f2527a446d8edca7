"""What every data module here shares: where data lives, the loaders, and the batches' augmentation on the device."""

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from resnet_lab.data.augmentations import (
    NO_AUGMENTATION,
    BatchAugmentation,
    BatchTransforms,
    MixBatch,
    Standardize,
    batch_key,
    checked_augmentations,
    image_seeds,
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


def collate_evaluation(samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor, int]:
    return (*default_collate(samples), NO_AUGMENTATION)


class BatchOrder(DistributedSampler):
    """Which images form each training batch, and where a resumed run goes on: a seeded permutation per epoch (the
    order, in evaluation), cut into global batches, of which this process takes the images `rank::world_size`.
    Yields (key, indices) per batch: the batch's key seeds its augmentation (`batch_key`), so a batch depends only on
    (seed, epoch, batch), on one process or N, in a run never stopped or resumed mid-epoch.

    Its `position` is the count of batches training took, which the loader counts (`taken`: with workers the order
    runs ahead of training); `state_dict` reports it, and the epoch a run resumes in starts at the batch after it.

    A `DistributedSampler` only so that Lightning, under data parallelism, does not wrap it in one of its own: it
    already gives each process its share.

    Args:
        size: images in the split.
        batch_size: images per batch of this process (the global batch is batch_size x world_size).
        train: shuffle every epoch and drop the last incomplete batch.
        seed: the permutation of epoch e uses seed + e.
        rank, world_size: this process's share under data parallelism.
        device: where the permutation is drawn: the device that holds the split, so that indexing it needs no copy
            (the permutations of a CPU and a GPU differ).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.size, self.batch_size, self.train, self.device = size, batch_size, train, torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # What Lightning reads of a DistributedSampler (DistributedSampler.__init__ would query the process group).
        self.num_replicas, self.shuffle, self.drop_last = world_size, train, train
        self.epoch = 0
        self.position = 0  # batches of the current epoch training took
        self.resume_at: tuple[int, int] | None = None  # (epoch, position) from a checkpoint

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = self.start()  # what a checkpoint written before the epoch's first batch must hold

    def state_dict(self) -> dict[str, int]:
        global_batch = self.batch_size * self.world_size
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "global_batch": global_batch,
                "size": self.size}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        # The position counts global batches, which are the same on any number of processes; another seed, global
        # batch or split makes other batches, and the epoch starts afresh. (Checkpoints before `global_batch` hold
        # the number of processes, whose batches were split alike.)
        global_batch = state.get("global_batch", self.batch_size * state.get("world_size", 0))
        same = (state.get("seed"), global_batch, state.get("size", self.size))
        if same == (self.seed, self.batch_size * self.world_size, self.size):
            epoch, position = state.get("epoch"), state.get("position")
            if isinstance(epoch, int) and isinstance(position, int) and 0 <= position <= len(self):
                self.resume_at = (epoch, position)

    def epoch_order(self) -> Tensor:
        """The images of the current epoch, in order, for every process: batch b is [b * step, (b + 1) * step)."""
        if not self.train:
            return torch.arange(self.size, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, device=self.device, generator=generator)

    def __len__(self) -> int:
        step = self.batch_size * self.world_size
        return self.size // step if self.train else -(-self.size // step)

    def start(self) -> int:
        """The first batch of the current epoch: the one after the last trained, in the epoch a run resumes in."""
        return self.resume_at[1] if self.resume_at and self.resume_at[0] == self.epoch else 0

    def taken(self, batches: Iterator[Any]) -> Iterator[Any]:
        """A loader's `batches` of this order, counted into `position` as training takes each."""
        self.position = self.start()
        for batch in batches:
            self.position += 1
            yield batch

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        step = self.batch_size * self.world_size
        order = self.epoch_order()
        for batch in range(self.start(), len(self)):
            indices = order[batch * step : (batch + 1) * step][self.rank :: self.world_size]
            if not len(indices):  # an evaluation share one image shorter than the others
                return
            yield (batch_key(self.seed, self.epoch, batch) if self.train else NO_AUGMENTATION), indices


class RepeatedAugmentationSampler(BatchOrder):
    """Repeated augmentation (Hoffer et al. 2020), as torchvision's ResNet-50 recipe trains with it: each epoch
    draws a seeded permutation, repeats every image `repetitions` times and deals the copies out over the processes
    (so one image's copies are augmented on different processes), and each process keeps the first
    `len(dataset) // 256 * 256 // world_size` of its share, so an epoch stays about one pass of images.

    torchvision keeps its `RASampler` in its training references, not in the library; this follows it, in batches.

    Args:
        size: images in the split.
        batch_size: images per batch of this process.
        repetitions: copies of each drawn image per epoch (4 in torchvision's recipe).
        seed: the permutation of epoch e uses seed + e.
        rank, world_size: this process's share.
    """

    def __init__(
        self, size: int, batch_size: int, repetitions: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(size, batch_size, True, seed, rank, world_size)
        self.repetitions = repetitions
        self.num_samples = size // 256 * 256 // world_size if size >= 256 else max(1, size // world_size)

    def epoch_order(self) -> Tensor:
        # The first num_samples of every process's share, rank::world_size, are the first num_samples x world_size.
        order = super().epoch_order().repeat_interleave(self.repetitions)
        return order[: self.num_samples * self.world_size]

    def __len__(self) -> int:
        return self.num_samples // self.batch_size


class ResumableLoader(DataLoader):
    """A DataLoader of whole batches in a `BatchOrder`'s order (`batch_size=None`), that Lightning saves in every
    checkpoint (`state_dict`) and resumes mid-epoch at the batch after the last one trained. It counts the batches
    it hands to training, since its workers fetch ahead of the order.

    torchdata's `StatefulDataLoader` counts alike, but does not give back the workers' random streams: the keys
    (`BatchOrder`, `KeyedSamples`) make the draws, so the count is all a resume needs.
    """

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        # A generator, so that the workers read the order at the first batch: Lightning creates the iterator before
        # it sets the sampler's epoch, and a run it resumes trains from that very iterator.
        yield from self.sampler.taken(super().__iter__())


class KeyedSamples(Dataset):
    """A per-image dataset (uint8 image, label) read by whole `BatchOrder` batches: each image's random draws (the
    crops, flips and colour changes of the workers' transform, which draws from torch's global generator) come from
    a seed of its own, from the batch's key and its place in the global batch, as `EachImage` seeds its images. So
    an image's crop depends only on (seed, epoch, batch, place), whichever worker or process makes it.

    Args:
        dataset: its item i is (uint8 image [C, H, W], label), the same size for every image.
        rank, world_size: this process's share of each global batch (images rank::world_size).
    """

    def __init__(self, dataset: Dataset, rank: int = 0, world_size: int = 1) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, batch: tuple[int, Tensor]) -> tuple[Tensor, Tensor, int]:
        key, indices = batch
        seeds = image_seeds(key, len(indices) * self.world_size)[self.rank :: self.world_size]
        samples = []
        with torch.random.fork_rng(devices=[]):  # in the training process itself when there are no workers
            for index, seed in zip(indices.tolist(), seeds.tolist(), strict=True):
                torch.default_generator.manual_seed(seed)  # torch.manual_seed would reseed the GPUs' as well
                samples.append(self.dataset[index])
        return (*default_collate(samples), key)


def batch_loader(dataset: Dataset, order: BatchOrder, num_workers: int) -> ResumableLoader:
    """The batches of `order` from `dataset` (indexed by (key, indices)), made in `num_workers` processes."""
    return ResumableLoader(
        dataset,
        sampler=order,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


# Hooks of ClassificationDataModule that were renamed when every training batch came to be made in a `BatchOrder`.
RENAMED_HOOKS = {
    "train_sampler": "train_order, which says which images form each training batch",
    "collate_fn": "eval_collate_fn for evaluation batches (training batches are stacked by KeyedSamples)",
}


class ClassificationDataModule(L.LightningDataModule):
    """Builds the loaders from `train_set`, `val_set` and `test_set`, which subclasses fill in `setup`, and
    transforms every batch once it is on the device (`on_after_batch_transfer`).

    Training batches come in a `BatchOrder` (`train_order`) from a `ResumableLoader`, each image's draws keyed
    (`KeyedSamples`), so a run resumes mid-epoch at the very next batch, drawn alike. A split's item i is a
    (uint8 image [C, H, W] on the 0-255 scale, label) pair, in training and in evaluation alike. The loaders hand
    over uint8 images, their labels and the batch's key; `BatchTransforms` applies the data's own augmentations
    (`data_augmentations`, e.g. ImageNet's PCA colour noise), then `augmentations`, then the normalisation
    (`normalize`, which subclasses set), then `mixing`.

    Args:
        batch_size: the global batch, split evenly over all processes (devices x nodes).
        num_workers: loader processes; None follows the machine.
        augmentations: applied in order to every training batch, on the device.
        mixing: mixes every training batch and its labels after the normalisation (`MixBatch`); None for none.
    """

    num_classes: int
    class_names: list[str] | None = None  # by class index, for figures and tables; None: the class numbers
    input_size: int  # height and width of the training images
    normalize: Standardize

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for old, new in RENAMED_HOOKS.items():  # an override Lightning would never call: refused, not ignored
            if old in vars(cls):
                raise TypeError(f"{cls.__name__}.{old} is no longer a hook of ClassificationDataModule: override {new}")

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

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning also passes the model's example input through here (for the graph and the summary): only this
        # module's own (uint8 images, labels, key) batches are transformed.
        if not (isinstance(batch, tuple | list) and len(batch) == 3 and isinstance(batch[2], int)):
            return batch
        images, labels, key = batch
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

    def eval_collate_fn(self) -> Callable:
        """How an evaluation loader's (uint8 image, label) samples form a batch, keyed as one to normalise only."""
        return collate_evaluation

    def _share(self) -> tuple[int, int]:
        """This process's (rank, world size) under data parallelism."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def built(self, split: Dataset | None) -> Dataset:
        """`split`, which `setup` must have built."""
        if split is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split")
        return split

    def train_order(self, size: int) -> BatchOrder:
        """Which images form each training batch of this process: a `BatchOrder` over `size` images."""
        return BatchOrder(size, self.process_batch_size, True, run_seed(), *self._share())

    def train_dataloader(self) -> ResumableLoader:
        dataset = KeyedSamples(self.built(self.train_set), *self._share())
        return batch_loader(dataset, self.train_order(len(self.train_set)), self.num_workers)

    def eval_loader(self, dataset: Dataset | None) -> DataLoader:
        """The loader of an evaluation split, in order, split over the processes by Lightning's sampler."""
        return DataLoader(
            self.built(dataset),
            batch_size=self.process_batch_size,
            collate_fn=self.eval_collate_fn(),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set)
