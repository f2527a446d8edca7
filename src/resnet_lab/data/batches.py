"""In-memory image splits, batched by a seeded order and augmented a whole batch at a time, in one place.

On a GPU a ResNet-20 step takes well under a millisecond of compute, so a loader that crops and flips one image
at a time in worker processes, then copies every batch over PCIe, is what limits training. Here each split is
a uint8 tensor; each epoch is one seeded permutation; a batch is a slice of it. Both loaders (the split on the
training device, or in host memory behind a DataLoader) hand over uint8 images with the batch's key, and the data
module's `on_after_batch_transfer` applies `BatchTransforms` on the device: the augmentations named in the config,
then the normalisation. An augmentation is one class with `draw` and `apply`.

The draws for batch i of epoch e come from one generator seeded with (seed, e, i), for every image of the global
batch; each process applies its share. So a run resumed mid-epoch continues with the very batches it would have
had, and N processes together see exactly what one process with the global batch would.
"""

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from resnet_lab.data.base import ClassificationDataModule, Standardize, run_seed

NO_AUGMENTATION = -1  # the key of an evaluation batch


class BatchAugmentation(nn.Module):
    """A random transform of a batch of images [B, C, H, W], its randomness drawn first for every image.

    `draw(n, generator)` returns the draws of n images, one row each (on the generator's device); `apply(images,
    draws)` transforms images with their rows. The data module draws for the global batch and applies each
    process's share, so subclasses need nothing else to be exactly resumable and the same under data parallelism.
    """

    def draw(self, batch_size: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def apply(self, images: Tensor, draws: Tensor) -> Tensor:
        raise NotImplementedError


def random_crop_flip(images: Tensor, padding: int, draws: Tensor) -> Tensor:
    """Zero-pad each image of [B, C, H, W] by `padding`, take the HxW window at its drawn offsets (`draws[:, 0:2]`),
    mirror the ones drawn for it (`draws[:, 2]`)."""
    batch, channels, height, width = images.shape
    device = images.device
    dy, dx, flip = draws.to(device).unbind(dim=1)
    padded = F.pad(images, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
    crops = padded.gather(2, rows.expand(batch, channels, height, width + 2 * padding))
    crops = crops.gather(3, cols.expand(batch, channels, height, width))
    return torch.where(flip.bool()[:, None, None, None], crops.flip(3), crops)


class PadCropFlip(BatchAugmentation):
    """The paper's CIFAR augmentation (Sec. 4.2): zero-pad by `padding`, a random window of the original size, a
    horizontal flip with probability 1/2; per image the same distribution as torchvision's
    `RandomCrop(size, padding) + RandomHorizontalFlip()`.

    Args:
        padding: pixels of zeros on each side before cropping (4 in the paper).
    """

    def __init__(self, padding: int = 4) -> None:
        super().__init__()
        self.padding = padding

    def draw(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """[batch_size, 3]: each image's window offsets (rows, columns) and whether it is mirrored."""
        device = generator.device
        offsets = torch.randint(0, 2 * self.padding + 1, (2, batch_size), device=device, generator=generator)
        flips = torch.randint(0, 2, (1, batch_size), device=device, generator=generator)
        return torch.cat((offsets, flips)).T

    def apply(self, images: Tensor, draws: Tensor) -> Tensor:
        return random_crop_flip(images, self.padding, draws)


class EachImage(BatchAugmentation):
    """A torchvision transform of one image, applied to every image of the batch on its own, as torchvision's
    references apply it (`RandAugment`, `TrivialAugmentWide`, `AutoAugment`, `RandomErasing`, ...): given the whole
    batch, these draw one random operation for all of its images.

    The transform draws its randomness from torch's global generator; each image gets a seed of its own from the
    batch's key, so what it becomes depends only on (seed, epoch, batch, image), like every augmentation here: a run
    resumed mid-epoch, or split over processes, sees the very same images. The seeds are drawn on the host (the
    key is known there), so no iteration waits for the device; the transforms themselves draw on the host too.

    Args:
        transform: a `torchvision.transforms.v2` transform of one uint8 image [C, H, W].
    """

    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        # Two such augmentations in one pipeline must not share their seeds.
        self.salt = zlib.crc32(repr(transform).encode())

    def draw(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """[batch_size, 1]: each image's seed, on the host."""
        host = torch.Generator().manual_seed((generator.initial_seed() + self.salt) % 2**63)
        return torch.randint(0, 2**62, (batch_size, 1), generator=host)

    def apply(self, images: Tensor, draws: Tensor) -> Tensor:
        out = torch.empty_like(images)
        with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
            for i, seed in enumerate(draws[:, 0].tolist()):
                torch.manual_seed(seed)
                out[i] = self.transform(images[i])
        return out


class MixBatch(BatchAugmentation):
    """A torchvision transform that mixes the images of a batch and their labels: `MixUp`, `CutMix`, or a
    `RandomChoice` of them. The labels become class probabilities, which the training loss takes as they are; the
    logged training error counts an image right when its top logit is the label of the larger weight.

    `BatchTransforms` applies it after the other augmentations and the normalisation: a convex combination of
    images, or a pasted rectangle, normalises to the same combination of the normalised images, and torchvision's
    mixing wants float images. Its draws (lambda, CutMix's box) are one per global batch, from the batch's key; each
    process mixes its own share, each image with the one before it, as torchvision's references do under data
    parallelism.

    Args:
        transform: e.g. `torchvision.transforms.v2.MixUp` with `alpha: 0.2`, or `CutMix` with `alpha: 1.0`.
    """

    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.salt = zlib.crc32(repr(transform).encode())

    def draw(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """[batch_size, 1]: the batch's seed, in every row (each process takes a share of the rows)."""
        return torch.full((batch_size, 1), (generator.initial_seed() + self.salt) % 2**62)

    def mix(self, images: Tensor, labels: Tensor, draws: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Float images [B, C, H, W] and labels [B] (or probabilities [B, classes]) of one share, mixed."""
        if labels.ndim == 1:
            labels = F.one_hot(labels, num_classes).to(images.dtype)
        with torch.random.fork_rng(devices=[]):  # torchvision draws on the host, from the global generator
            torch.manual_seed(int(draws[0, 0]) if len(draws) else 0)
            return self.transform(images, labels)


def batch_key(seed: int, epoch: int, index: int) -> int:
    """One seed per (seed, epoch, batch), by arithmetic: the same on every platform, no state to replay."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63


class BatchTransforms(nn.Module):
    """The one place a CIFAR-style batch is transformed: each augmentation in order (training batches only), then
    the normalisation of the [0, 1] float images, then any `MixBatch` (which mixes the labels too).

    Args:
        augmentations: applied in order to training batches.
        normalize: applied to every batch.
        num_classes: the labels' classes, for mixing them.
    """

    def __init__(self, augmentations: Sequence[BatchAugmentation], normalize: Standardize, num_classes: int) -> None:
        super().__init__()
        self.augmentations = nn.ModuleList(augmentations)
        self.normalize = normalize
        self.num_classes = num_classes

    def forward(
        self, images: Tensor, labels: Tensor, key: int, rank: int = 0, world_size: int = 1
    ) -> tuple[Tensor, Tensor]:
        """`images`, `labels`: this process's uint8 share of a global batch, whose images are `rank::world_size`."""
        mixes = []
        if key != NO_AUGMENTATION and len(self.augmentations):
            generator = torch.Generator(device=images.device).manual_seed(key)
            for augmentation in self.augmentations:
                draws = augmentation.draw(len(images) * world_size, generator)[rank::world_size]
                if isinstance(augmentation, MixBatch):
                    mixes.append((augmentation, draws))
                else:
                    images = augmentation.apply(images, draws)
        if self.normalize.mean.device != images.device:
            self.normalize.to(images.device)
        images = self.normalize(images.float().div_(255))
        for mix, draws in mixes:
            images, labels = mix.mix(images, labels, draws, self.num_classes)
        return images, labels


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
    """

    normalize: Standardize

    def __init__(
        self,
        batch_size: int,
        num_workers: int | None,
        augmentations: Sequence[BatchAugmentation],
        loader: str = "device",
        seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.augmentations = list(augmentations)
        self.loader = loader
        self.seed = seed
        self._transforms: BatchTransforms | None = None

    @property
    def data_seed(self) -> int:
        """`seed`, or the run's seed (`run_seed`)."""
        return self.seed if self.seed is not None else run_seed()

    @property
    def batch_transforms(self) -> BatchTransforms:
        if self._transforms is None or self._transforms.normalize is not self.normalize:
            self._transforms = BatchTransforms(self.augmentations, self.normalize, self.num_classes)
        return self._transforms

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
