"""In-memory image splits, batched by a seeded order, for data that fits in memory as uint8 tensors.

On a GPU a ResNet-20 step takes well under a millisecond of compute, so a loader that crops and flips one image
at a time in worker processes, then copies every batch over PCIe, is what limits training. Here each split is
a uint8 tensor; each epoch is one seeded permutation; a batch is a slice of it. Both loaders (the split on the
training device, or in host memory behind a DataLoader) hand over uint8 images with the batch's key, and the data
module's `on_after_batch_transfer` augments and normalises them on the device (`resnet_lab.data.augmentations`).

The key of batch i of epoch e is (seed, e, i): a run resumed mid-epoch continues with the very batches it would have
had, augmented alike, and N processes together see exactly what one process with the global batch would.
"""

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# The augmentation protocol lived here before it served every data module: run folders saved before name its classes
# here (`resnet_lab.data.batches.EachImage`), so they still import from here.
from resnet_lab.data.augmentations import (  # noqa: F401
    NO_AUGMENTATION,
    BatchAugmentation,
    BatchTransforms,
    EachImage,
    MixBatch,
    PadCropFlip,
    batch_key,
)
from resnet_lab.data.base import ClassificationDataModule, run_seed


class BatchOrder(DistributedSampler):
    """Which images form each batch: a seeded permutation per training epoch (the order in evaluation), cut into
    global batches, of which this process takes the images `rank::world_size`. Yields (key, indices) per batch and
    reports its position (`state_dict`), so that a run resumed mid-epoch continues with the next batch.

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
        self.position = 0  # batches of the current epoch handed out
        self.resume_at: tuple[int, int] | None = None  # (epoch, position) from a checkpoint

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        # Lightning does not prefetch from a loader with a length, so `position` is what training consumed.
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # With another number of processes or seed the batches differ anyway: start the epoch afresh.
        if state.get("world_size") == self.world_size and state.get("seed") == self.seed:
            self.resume_at = (state["epoch"], state["position"])

    def __len__(self) -> int:
        step = self.batch_size * self.world_size
        return self.size // step if self.train else -(-self.size // step)

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        step = self.batch_size * self.world_size
        if self.train:
            generator = torch.Generator(device=self.device).manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, device=self.device, generator=generator)
        else:
            order = torch.arange(self.size, device=self.device)
        start = self.resume_at[1] if self.resume_at and self.resume_at[0] == self.epoch else 0
        self.resume_at, self.position = None, start
        for batch in range(start, len(self)):
            indices = order[batch * step : (batch + 1) * step][self.rank :: self.world_size]
            if not len(indices):  # an evaluation share one image shorter than the others
                return
            self.position = batch + 1
            yield (batch_key(self.seed, self.epoch, batch) if self.train else NO_AUGMENTATION), indices


class ImageSplit(Dataset):
    """One split: uint8 images [N, C, H, W] and int64 labels [N], indexed by whole batches (a `BatchOrder`'s
    (key, indices)), which is how both loaders read it."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, batch: tuple[int, Tensor]) -> tuple[Tensor, Tensor, int]:
        key, indices = batch
        return self.images[indices], self.labels[indices], key


class DeviceBatches:
    """(uint8 images, labels, key) batches sliced from a split held on the training device: no worker processes,
    no copies, no per-sample Python.

    Args:
        images: uint8 [N, C, H, W], already on the device.
        labels: int64 [N], on the same device.
        order: which images form each batch, drawn on the same device.
    """

    batch_sampler = None  # Lightning inspects a loader's samplers; batches are made here instead

    def __init__(self, images: Tensor, labels: Tensor, order: BatchOrder) -> None:
        self.split, self.order = ImageSplit(images, labels), order

    @property
    def sampler(self) -> BatchOrder:
        # Lightning calls `loader.sampler.set_epoch(epoch)` before each epoch.
        return self.order

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        for batch in self.order:
            yield self.split[batch]


def dataloader_batches(split: ImageSplit, order: BatchOrder, num_workers: int) -> DataLoader:
    """The same batches as `DeviceBatches`, gathered in `num_workers` processes from host memory and copied to the
    device (for splits that should not occupy device memory)."""
    return DataLoader(
        split,
        sampler=order,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


class InMemoryDataModule(ClassificationDataModule):
    """A data module whose splits fit in memory as uint8 tensors (CIFAR, the synthetic demo): batches by a seeded
    `BatchOrder`, from the device (`loader="device"`) or a DataLoader (`loader="dataloader"`), transformed in
    `on_after_batch_transfer` by the same `BatchTransforms` either way.

    Subclasses fill `train_set`, `val_set`, `test_set` (`ImageSplit`) and `normalize` in `setup`.

    Args:
        batch_size: the global batch, split evenly over all processes.
        num_workers: DataLoader processes of the "dataloader" path; None follows the machine.
        augmentations: applied in order to every training batch.
        loader: "device" keeps each split on the training device; "dataloader" keeps it in host memory and copies
            each batch over. Both give the same batches (on the same device) and the same augmentation.
        seed: base seed of the shuffle and the augmentation draws; None follows the run's `seed_everything`.
        mixing: mixes every training batch and its labels after the normalisation; None for none.
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int | None,
        augmentations: Sequence[BatchAugmentation],
        loader: str = "device",
        seed: int | None = None,
        mixing: MixBatch | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, augmentations, mixing)
        self.loader = loader
        self.seed = seed

    @property
    def data_seed(self) -> int:
        """`seed`, or the run's seed (`run_seed`)."""
        return self.seed if self.seed is not None else run_seed()

    def _loader(self, split: ImageSplit | None, train: bool) -> DeviceBatches | DataLoader:
        if split is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split")
        on_device = self.loader == "device"
        device = self.trainer.strategy.root_device if on_device and self.trainer is not None else torch.device("cpu")
        rank, world_size = self._share()
        order = BatchOrder(len(split), self.process_batch_size, train, self.data_seed, rank, world_size, device)
        if on_device:
            return DeviceBatches(split.images.to(device), split.labels.to(device), order)
        return dataloader_batches(split, order, self.num_workers)
