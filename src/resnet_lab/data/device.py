"""Batches made on the training device: a whole split held there as uint8, augmented a batch at a time.

On a GPU a ResNet-20 step takes well under a millisecond of compute, so a loader that crops and flips one image
at a time in worker processes, then copies every batch over PCIe, is what limits training. Here the split is
copied once; each epoch is one seeded permutation, and padding, cropping, flipping and normalising are a few
tensor operations on the whole batch. No worker processes, no per-sample Python.
"""

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_lab.data.base import Standardize


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad each image of [B, C, H, W] by `padding`, take a random HxW window of it, mirror half of them.

    The same distribution as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip() per image.
    """
    batch, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, batch), device=device, generator=generator)
    rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
    crops = padded.gather(2, rows.expand(batch, channels, height, width + 2 * padding))
    crops = crops.gather(3, cols.expand(batch, channels, height, width))
    flip = torch.rand(batch, device=device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


class DeviceBatches:
    """An iterable of (images, labels) batches built on the device that holds the data.

    Args:
        images: uint8 [N, C, H, W], already on the device.
        labels: int64 [N], on the same device.
        batch_size: images per batch (per process).
        normalize: applied to the [0, 1] float batch.
        train: shuffle every epoch and drop the last incomplete batch.
        augment: pad-crop-flip each batch.
        padding: crop padding of the augmentation.
        seed: the permutation and augmentation of epoch e use seed + e.
        rank, world_size: this process's shard of every epoch under data parallelism.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        normalize: Standardize,
        train: bool,
        augment: bool,
        padding: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.normalize = copy.deepcopy(normalize).to(images.device)  # Module.to() would move the caller's too
        self.train = train
        self.augment = augment
        self.padding = padding
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    batch_sampler = None  # Lightning inspects a loader's samplers; batches are made here instead

    @property
    def sampler(self) -> "DeviceBatches":
        # Lightning calls `loader.sampler.set_epoch(epoch)` before each epoch.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_size(self) -> int:
        return len(self.labels) // self.world_size if self.train else -(-len(self.labels) // self.world_size)

    def __len__(self) -> int:
        size = self._shard_size()
        return size // self.batch_size if self.train else -(-size // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.images.device
        generator = torch.Generator(device=device).manual_seed(self.seed + self.epoch)
        n = len(self.labels)
        if self.train:
            # Every process draws the same permutation and keeps its own equal-sized shard.
            order = torch.randperm(n, device=device, generator=generator)
            order = order[self.rank : self._shard_size() * self.world_size : self.world_size]
        else:
            order = torch.arange(self.rank, n, self.world_size, device=device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            if not len(index):  # an evaluation shard one image shorter than the others
                return
            images = self.images[index]
            if self.augment:
                images = random_crop_flip(images, self.padding, generator)
            yield self.normalize(images.float().div_(255)), self.labels[index]
