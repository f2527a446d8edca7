"""A small synthetic image set for demos and smoke tests: it needs no download and is learnable in seconds."""

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_lab.data.augmentations import PadCropFlip
from resnet_lab.data.base import fit_standardize
from resnet_lab.data.batches import ImageSplit, InMemoryDataModule
from resnet_lab.errors import ConfigError


def make_synthetic_images(num_images: int, num_classes: int, image_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """uint8 images [N, 3, S, S]: a smooth random pattern per class plus per-image noise. Not real data."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, 3, 4, 4, generator=g)
    patterns = F.interpolate(patterns, size=image_size, mode="bilinear", align_corners=False)
    labels = torch.randint(num_classes, (num_images,), generator=g)
    images = patterns[labels] + 1.0 * torch.randn(num_images, 3, image_size, image_size, generator=g)
    return (images * 48 + 128).clamp_(0, 255).to(torch.uint8), labels


class SyntheticDataModule(InMemoryDataModule):
    """SYNTHETIC images (class-dependent smooth patterns plus noise), CIFAR-shaped by default.

    For the demo config and smoke tests: runs anywhere with no download and shows a falling loss within a
    minute on a laptop CPU. Its numbers say nothing about any real dataset.

    Args:
        num_classes: number of classes (patterns).
        image_size: height and width of the square images.
        train_size: training images (augmented with the CIFAR pad + crop + flip).
        val_size: validation images; the test set is a further set of the same size.
        batch_size: the global batch, split evenly over all devices and nodes.
        seed: seed of the patterns, labels and noise.
        num_workers: loader processes; None follows the machine.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        train_size: int = 4096,
        val_size: int = 512,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int | None = 0,
    ) -> None:
        # The CIFAR augmentation, scaled to the image size; the batches come from the device, as CIFAR's do.
        super().__init__(batch_size, num_workers, [PadCropFlip(image_size // 8)])
        if num_classes < 2 or train_size < 1 or val_size < 1:
            raise ConfigError("SyntheticDataModule needs num_classes >= 2, train_size >= 1 and val_size >= 1")
        self.num_classes = num_classes
        self.image_size = self.input_size = image_size
        self.train_size = train_size
        self.val_size = val_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        n_train, n_val = self.train_size, self.val_size
        images, labels = make_synthetic_images(n_train + 2 * n_val, self.num_classes, self.image_size, self.seed)
        self.normalize = fit_standardize(images[:n_train], per_pixel=False)
        self.train_set = ImageSplit(images[:n_train], labels[:n_train])
        self.val_set = ImageSplit(images[n_train : n_train + n_val], labels[n_train : n_train + n_val])
        self.test_set = ImageSplit(images[n_train + n_val :], labels[n_train + n_val :])
