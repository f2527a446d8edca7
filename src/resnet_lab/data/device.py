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


def random_crop_flip(images: Tensor, padding: int, draws: Tensor) -> Tensor:
    """Zero-pad each image of [B, C, H, W] by `padding`, take the HxW window at its drawn offsets, mirror the ones
    drawn for it.

    With `draws` from `crop_flip_draws`, the same distribution as torchvision's RandomCrop(size, padding) +
    RandomHorizontalFlip() per image.
    """
    batch, channels, height, width = images.shape
    device = images.device
    dy, dx, flip = draws
    padded = F.pad(images, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
    crops = padded.gather(2, rows.expand(batch, channels, height, width + 2 * padding))
    crops = crops.gather(3, cols.expand(batch, channels, height, width))
    return torch.where(flip.bool()[:, None, None, None], crops.flip(3), crops)


def crop_flip_draws(batch: int, padding: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """[3, batch]: each image's window offsets (rows, columns) and whether it is mirrored."""
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), device=device, generator=generator)
    flips = torch.randint(0, 2, (1, batch), device=device, generator=generator)
    return torch.cat((offsets, flips))


class DeviceBatches:
    """An iterable of (images, labels) batches built on the device that holds the data.

    Under data parallelism every process draws the same epoch permutation and the same augmentation for each
    global batch and keeps its own strided share, so the processes together see exactly what one process with
    the global batch would. The augmentation of batch i of epoch e depends only on (seed, e, i), and the loader
    reports its position (`state_dict`), so a run resumed mid-epoch continues with the very batches it would have
    had (Lightning saves and restores the state with each checkpoint).

    Args:
        images: uint8 [N, C, H, W], already on the device.
        labels: int64 [N], on the same device.
        batch_size: images per batch of this process (the global batch is batch_size x world_size).
        normalize: applied to the [0, 1] float batch.
        train: shuffle every epoch and drop the last incomplete batch.
        augment: pad-crop-flip each batch.
        padding: crop padding of the augmentation.
        seed: the permutation of epoch e uses seed + e.
        rank, world_size: this process's share under data parallelism.
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
        self.position = 0  # batches of the current epoch handed out
        self.resume_at: tuple[int, int] | None = None  # (epoch, position) from a checkpoint

    batch_sampler = None  # Lightning inspects a loader's samplers; batches are made here instead

    @property
    def sampler(self) -> "DeviceBatches":
        # Lightning calls `loader.sampler.set_epoch(epoch)` before each epoch.
        return self

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
        if self.train:
            return len(self.labels) // (self.batch_size * self.world_size)
        return -(-len(self.labels) // (self.batch_size * self.world_size))

    def _batch_generator(self, index: int) -> torch.Generator:
        # One stream per (seed, epoch, batch): a resumed epoch needs no replay of the batches before it.
        seed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63
        return torch.Generator(device=self.images.device).manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.images.device
        n, step = len(self.labels), self.batch_size * self.world_size
        if self.train:
            generator = torch.Generator(device=device).manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, device=device, generator=generator)
        else:
            order = torch.arange(n, device=device)
        start = self.resume_at[1] if self.resume_at and self.resume_at[0] == self.epoch else 0
        self.resume_at, self.position = None, start
        share = slice(self.rank, None, self.world_size)
        for batch in range(start, len(self)):
            index = order[batch * step : (batch + 1) * step][share]
            if not len(index):  # an evaluation share one image shorter than the others
                return
            images = self.images[index]
            if self.augment:  # drawn for the global batch: each process applies its share
                draws = crop_flip_draws(step, self.padding, self._batch_generator(batch), device)[:, share]
                images = random_crop_flip(images, self.padding, draws)
            self.position = batch + 1
            yield self.normalize(images.float().div_(255)), self.labels[index]
