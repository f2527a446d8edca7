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
from torch.utils.data import DataLoader, Dataset

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
from resnet_lab.data.base import BatchOrder, ClassificationDataModule, batch_loader, run_seed


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
        return self.order.taken(self.split[batch] for batch in self.order)


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
        split = self.built(split)
        on_device = self.loader == "device"
        device = self.trainer.strategy.root_device if on_device and self.trainer is not None else torch.device("cpu")
        rank, world_size = self._share()
        order = BatchOrder(len(split), self.process_batch_size, train, self.data_seed, rank, world_size, device)
        if on_device:
            return DeviceBatches(split.images.to(device), split.labels.to(device), order)
        return batch_loader(split, order, self.num_workers)

    def train_dataloader(self) -> DeviceBatches | DataLoader:
        return self._loader(self.train_set, train=True)

    def eval_loader(self, split: ImageSplit | None) -> DeviceBatches | DataLoader:
        return self._loader(split, train=False)
