"""The one augmentation protocol of every data module here, applied once per batch on the training device.

Every loader hands over (uint8 images, labels, key); the data module's `on_after_batch_transfer`
(`ClassificationDataModule`) runs `BatchTransforms` on them: the training augmentations in order, then the
normalisation, then the mixing. An augmentation is one `BatchAugmentation` with `draw` and `apply`; mixing, which
changes the labels as well, is its own protocol (`MixBatch`, with `draw` and `mix`) and its own argument.

The draws of a training batch come from one generator seeded with the batch's key, for every image of the global
batch; each process applies its share. So an augmented batch depends only on (seed, epoch, batch): a run resumed
mid-epoch redraws what it would have had, and N processes together see what one process with the global batch would.
"""

import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_lab.errors import ConfigError

NO_AUGMENTATION = -1  # the key of an evaluation batch: normalised only


class Standardize(nn.Module):
    """(x - mean) / std with broadcasting, so `mean` can be a per-pixel image (the paper's CIFAR input)."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: Tensor) -> Tensor:
        """The pixels in [0, 1] that `forward` made `x` of (to show a batch as the network gets it)."""
        return x * self.std + self.mean


class BatchAugmentation(nn.Module):
    """A random transform of a batch of images [B, C, H, W], its randomness drawn first for every image.

    `draw(n, generator)` returns the draws of n images, one row each (on the generator's device); `apply(images,
    draws)` transforms images with their rows. The data module draws for the global batch and applies each
    process's share, so subclasses need nothing else to be exactly resumable and the same under data parallelism.

    Images are pixels on the 0-255 scale: uint8 as loaded, or float once an augmentation has added changes finer
    than a level (the paper's PCA colour noise); `apply` returns the same kind, of the same shape.
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
        return image_seeds(generator.initial_seed() + self.salt, batch_size)[:, None]

    def apply(self, images: Tensor, draws: Tensor) -> Tensor:
        if images.is_floating_point():
            # torchvision's colour operations read float images as [0, 1] and some take uint8 alone: after an
            # augmentation that made them float (ImageNet's PCA colour noise), the pixels go back to the nearest level.
            images = images.round().clamp_(0, 255).to(torch.uint8)
        out = torch.empty_like(images)
        with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
            for i, seed in enumerate(draws[:, 0].tolist()):
                torch.manual_seed(seed)
                out[i] = self.transform(images[i])
        return out


def mixing_misplaced(augmentation: nn.Module) -> str:
    """The one-line refusal of a `MixBatch` given as an augmentation."""
    return (
        f"{type(augmentation).__name__} mixes images and their labels, after the normalisation: it is not one of "
        "data.init_args.augmentations; move it to data.init_args.mixing (configs/presets/mixup.yaml shows how)"
    )


class MixBatch(BatchAugmentation):
    """A torchvision transform that mixes the images of a batch and their labels: `MixUp`, `CutMix`, or a
    `RandomChoice` of them; a data module's `mixing`. The labels become class probabilities, which the training loss
    takes as they are; the logged training error counts an image right when its top logit is the label of the
    larger weight.

    Its protocol is `draw` and `mix`, not `apply`: the data module mixes after the augmentations and the
    normalisation (a convex combination of images, or a pasted rectangle, normalises to the same combination of the
    normalised images, and torchvision's mixing wants float images). It subclasses `BatchAugmentation` only so that
    an old config that lists it among the augmentations parses, and is told in one line where it goes. Its draws
    (lambda, CutMix's box) are one per global batch, from the batch's key; each process mixes its own share, each
    image with the one before it, as torchvision's references do under data parallelism.

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

    def apply(self, images: Tensor, draws: Tensor) -> Tensor:
        raise ConfigError(mixing_misplaced(self))

    def mix(self, images: Tensor, labels: Tensor, draws: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Float images [B, C, H, W] and labels [B] (or probabilities [B, classes]) of one share, mixed."""
        if labels.ndim == 1:
            labels = F.one_hot(labels, num_classes).to(images.dtype)
        with torch.random.fork_rng(devices=[]):  # torchvision draws on the host, from the global generator
            torch.default_generator.manual_seed(int(draws[0, 0]) if len(draws) else 0)  # not the GPUs' too
            return self.transform(images, labels)


def checked_augmentations(augmentations: Sequence[BatchAugmentation]) -> list[BatchAugmentation]:
    """`augmentations` as a list; a `MixBatch` among them (where configs before the `mixing` argument put it) is
    refused, before any data is read."""
    for augmentation in augmentations:
        if isinstance(augmentation, MixBatch):
            raise ConfigError(mixing_misplaced(augmentation))
    return list(augmentations)


def batch_key(seed: int, epoch: int, index: int) -> int:
    """One seed per (seed, epoch, batch), by arithmetic: the same on every platform, no state to replay."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63


def image_seeds(key: int, count: int) -> Tensor:
    """A seed for each of `count` images from one key, drawn on the host: for transforms of one image at a time,
    which draw from torch's global generator."""
    return torch.randint(0, 2**62, (count,), generator=torch.Generator().manual_seed(key % 2**63))


def to_input(images: Tensor | list, normalize: Standardize) -> Tensor | list:
    """Pixels on the 0-255 scale as normalised float32, as torchvision's `ToDtype(scale=True)` and `Normalize`
    compute them (to the bit); evaluation's lists of views of different sizes view by view."""
    if isinstance(images, list | tuple):
        return [to_input(view, normalize) for view in images]
    return normalize(images.to(torch.float32).mul_(1.0 / 255))


class BatchTransforms(nn.Module):
    """The one place a batch is transformed: each augmentation in order (training batches only), then the
    normalisation (every batch), then the mixing (training batches only; it mixes the labels too).

    Args:
        augmentations: applied in order to training batches.
        normalize: applied to every batch, to its pixels scaled to [0, 1].
        num_classes: the labels' classes, for mixing them.
        mixing: mixes every training batch and its labels after the normalisation; None for none.
    """

    def __init__(
        self,
        augmentations: Sequence[BatchAugmentation],
        normalize: Standardize,
        num_classes: int,
        mixing: MixBatch | None = None,
    ) -> None:
        super().__init__()
        self.augmentations = nn.ModuleList(checked_augmentations(augmentations))
        self.normalize = normalize
        self.num_classes = num_classes
        self.mixing = mixing

    def forward(
        self, images: Tensor | list, labels: Tensor, key: int, rank: int = 0, world_size: int = 1
    ) -> tuple[Tensor | list, Tensor]:
        """`images`, `labels`: this process's share of a global batch, whose images are `rank::world_size`; uint8
        [B, C, H, W] for training, and for evaluation also [B, views, C, H, W] or one list of views per image."""
        device = (images[0][0] if isinstance(images, list | tuple) else images).device
        if self.normalize.mean.device != device:  # once: every augmentation's buffers with the normalisation's
            self.to(device)
        training = key != NO_AUGMENTATION and (len(self.augmentations) > 0 or self.mixing is not None)
        if training:
            generator = torch.Generator(device=device).manual_seed(key)
            for augmentation in self.augmentations:
                draws = augmentation.draw(len(images) * world_size, generator)[rank::world_size]
                images = augmentation.apply(images, draws)
        images = to_input(images, self.normalize)
        if training and self.mixing is not None:
            draws = self.mixing.draw(len(images) * world_size, generator)[rank::world_size]
            images, labels = self.mixing.mix(images, labels, draws, self.num_classes)
        return images, labels
