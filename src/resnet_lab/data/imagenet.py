"""ImageNet, or any ImageFolder-layout subset of it, with the paper's training augmentation (Sec. 3.4)."""

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from resnet_lab.data.base import ClassificationDataModule, resolve_root
from resnet_lab.errors import ConfigError, DatasetNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Principal components of ImageNet RGB pixels, as used by AlexNet's colour augmentation (fb.resnet.torch values).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))

LAYOUT_HELP = "expected <root>/train/<class>/<image> and <root>/val/<class>/<image> (ImageFolder layout)"


def read_rgb(path: str) -> Tensor:
    """Decode any JPEG/PNG, grayscale included, to a uint8 RGB tensor [3, H, W]."""
    return decode_image(path, mode=ImageReadMode.RGB)


class PCALighting(nn.Module):
    """AlexNet's colour augmentation: add eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, std)."""

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        self.std = std
        self.register_buffer("eigval", torch.tensor(PCA_EIGVAL))
        self.register_buffer("eigvec", torch.tensor(PCA_EIGVEC))

    def forward(self, x: Tensor) -> Tensor:
        if self.std == 0:
            return x
        alpha = torch.randn(3) * self.std
        return x + (self.eigvec @ (alpha * self.eigval))[:, None, None]


def class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DatasetNotFoundError(f"{split_dir} does not exist: {LAYOUT_HELP}")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{split_dir} holds no class folders: {LAYOUT_HELP}")
    return classes


class ImageNetDataModule(ClassificationDataModule):
    """ImageNet-1k or any ImageFolder-layout subset (e.g. Imagenette); classes follow the folders.

    Args:
        root: folder holding `train/` and `val/`; default `$RESNET_LAB_DATA/imagenet`, else `./data/imagenet`.
        batch_size: per device (the paper's 256 is the global batch).
        train_augmentation: "paper": shorter side resized to a random size in `scale_range`, random crop, flip,
            PCA colour noise (Sec. 3.4); "inception": RandomResizedCrop with `area_range` + flip.
        crop_size: training and validation crop (224 in the paper; smaller makes research runs cheaper).
        scale_range: shorter-side range of the "paper" augmentation.
        area_range: crop-area range of the "inception" augmentation.
        val_resize: shorter side of validation images before the centre crop.
        num_workers: decoding processes; None follows the machine.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        train_augmentation: Literal["paper", "inception"] = "paper",
        crop_size: int = 224,
        scale_range: tuple[int, int] = (256, 480),
        area_range: tuple[float, float] = (0.08, 1.0),
        val_resize: int = 256,
        num_workers: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not scale_range[0] <= scale_range[1] or scale_range[0] < crop_size:
            raise ConfigError(f"scale_range {scale_range} must be increasing and start at >= crop_size {crop_size}")
        self.root = resolve_root(root) if root is not None else resolve_root(None) / "imagenet"
        self.classes = class_folders(self.root / "train")
        self.num_classes = len(self.classes)
        self.train_augmentation = train_augmentation
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.area_range = area_range
        self.val_resize = val_resize

    def train_transform(self) -> v2.Compose:
        normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        to_float = v2.ToDtype(torch.float32, scale=True)
        if self.train_augmentation == "paper":
            low, high = self.scale_range
            return v2.Compose(
                [
                    v2.RandomShortestSize(list(range(low, high + 1)), antialias=True),
                    v2.RandomCrop(self.crop_size),
                    v2.RandomHorizontalFlip(),
                    to_float,
                    PCALighting(0.1),
                    normalize,
                ]
            )
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.crop_size, scale=self.area_range, antialias=True),
                v2.RandomHorizontalFlip(),
                to_float,
                normalize,
            ]
        )

    def val_transform(self) -> v2.Compose:
        return v2.Compose(
            [
                v2.Resize(self.val_resize, antialias=True),
                v2.CenterCrop(self.crop_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def _folder(self, split: str, transform: v2.Compose) -> ImageFolder:
        split_dir = self.root / split
        if class_folders(split_dir) != self.classes:
            raise DatasetNotFoundError(f"{split_dir} must hold the same class folders as {self.root / 'train'}")
        return ImageFolder(str(split_dir), transform=transform, loader=read_rgb)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = self._folder("train", self.train_transform())
        # The ILSVRC validation set doubles as the test set: the paper's tables report it.
        self.val_set = self.test_set = self._folder("val", self.val_transform())
