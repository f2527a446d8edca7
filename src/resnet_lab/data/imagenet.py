"""ImageNet, or any ImageFolder-layout subset of it: the paper's augmentation and test modes (Sec. 3.4)."""

import logging
import multiprocessing
import warnings
from collections.abc import Callable
from copy import deepcopy
from functools import cache, partial
from importlib.resources import files
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from resnet_lab.data.augmentations import (
    NO_AUGMENTATION,
    BatchAugmentation,
    MixBatch,
    Standardize,
)
from resnet_lab.data.base import (
    BatchOrder,
    ClassificationDataModule,
    RepeatedAugmentationSampler,
    resolve_root,
    run_seed,
)
from resnet_lab.data.decode import DEFAULT_DECODER, Decoder, read_rgb, read_transformed, simplejpeg_missing
from resnet_lab.errors import ConfigError, DataError, DatasetNotFoundError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean pixel on the 0-255 scale, rounded: what uint8 images are erased to where torchvision erases the normalised
# image to 0 (within half a level of the mean).
IMAGENET_MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)
# Principal components of ImageNet RGB pixels for AlexNet's colour augmentation (the values fb.resnet.torch uses).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
PAPER_TEST_SCALES = (224, 256, 384, 480, 640)

LAYOUT_HELP = (
    "expected <root>/train/<wnid>/<image> and <root>/val/<wnid>/<image> (ImageFolder layout; for the official "
    "ILSVRC validation folder run `python -m resnet_lab.data.ilsvrc_val` first)"
)
EvalMode = Literal["center", "ten_crop", "multi_scale"]


def imagenet_standardize() -> Standardize:
    """The normalisation by ImageNet's channel mean and std."""
    return Standardize(torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None])


@cache
def imagenet_class_names() -> dict[str, str]:
    """wnid -> human-readable name for the 1000 ImageNet-1k classes, in class-index order."""
    text = files("resnet_lab.data").joinpath("imagenet_synsets.txt").read_text()
    return dict(line.split(" ", 1) for line in text.splitlines() if line.strip())


class PCALighting(BatchAugmentation):
    """AlexNet's colour augmentation, per image: add eigvec @ (alpha * eigval) to every pixel (of [0, 1] pixels),
    alpha ~ N(0, std^2) in each of the 3 components, drawn per image.

    The shift is not a whole number of levels (its std is about 3 of the 255 levels at `std` 0.1), so the images
    become float on the 0-255 scale, neither rounded nor clipped: the very pixels of adding it to the [0, 1] image
    (AlexNet and fb.resnet.torch clip nothing either).

    Args:
        std: std of alpha (0.1 in AlexNet and the paper).
    """

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        self.std = std
        self.register_buffer("eigval", torch.tensor(PCA_EIGVAL))
        self.register_buffer("eigvec", torch.tensor(PCA_EIGVEC))

    def draw(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """[batch_size, 3]: each image's alpha."""
        return torch.randn(batch_size, 3, device=generator.device, generator=generator) * self.std

    def apply(self, images: Tensor, draws: Tensor) -> Tensor:
        # [B, 3]: eigvec @ (alpha * eigval) for each image (the buffers are on the device with BatchTransforms).
        shift = (draws.to(images.device) * self.eigval) @ self.eigvec.T
        return images.float() + 255 * shift[:, :, None, None]


class ImageAugmentation:
    """An ImageFolder data module's training augmentation, in two parts: `build(crop_size)` returns the per-image
    "loader transform" that DataLoader workers apply to each decoded uint8 image [3, H, W], giving a uint8 crop
    [3, crop_size, crop_size] (the random scale, crop and flip, and whatever only works one image at a time);
    `batch_augmentations()` returns what is done to the whole batch on the device after the transfer, before the
    data module's `augmentations`, its normalisation and its mixing. A new one is one subclass, named in the config
    as `data.train_augmentation`."""

    def build(self, crop_size: int) -> nn.Module:
        raise NotImplementedError

    def batch_augmentations(self) -> list[BatchAugmentation]:
        """This augmentation's part on the device, for the whole batch; none by default."""
        return []


class PaperAugmentation(ImageAugmentation):
    """The paper's ImageNet augmentation (Sec. 3.4): the shorter side resized to a random size in `scale_range`, a
    random `crop_size` crop or its mirror (in the workers), AlexNet's PCA colour noise (on the device).

    Args:
        scale_range: the shorter side's range (256-480 in the paper; lower it with `crop_size` for cheaper runs).
        lighting_std: std of the PCA colour noise (0.1 in AlexNet; 0 turns it off).
    """

    def __init__(self, scale_range: tuple[int, int] = (256, 480), lighting_std: float = 0.1) -> None:
        self.scale_range = tuple(scale_range)
        self.lighting_std = lighting_std

    def build(self, crop_size: int) -> nn.Module:
        low, high = self.scale_range
        if not low <= high or low < crop_size:
            raise ConfigError(
                f"scale_range {self.scale_range} must be increasing and start at >= crop_size {crop_size}"
            )
        return v2.Compose(
            [
                v2.RandomShortestSize(list(range(low, high + 1)), antialias=True),
                v2.RandomCrop(crop_size),
                v2.RandomHorizontalFlip(),
            ]
        )

    def batch_augmentations(self) -> list[BatchAugmentation]:
        return [PCALighting(self.lighting_std)] if self.lighting_std > 0 else []


class InceptionAugmentation(ImageAugmentation):
    """Inception-style crops, the modern default: a random crop of `area_range` of the image and an aspect ratio in
    [3/4, 4/3], resized to `crop_size`, and a horizontal flip (all in the workers).

    Args:
        area_range: the crop's share of the image's area.
    """

    def __init__(self, area_range: tuple[float, float] = (0.08, 1.0)) -> None:
        self.area_range = tuple(area_range)

    def build(self, crop_size: int) -> nn.Module:
        return v2.Compose(
            [v2.RandomResizedCrop(crop_size, scale=self.area_range, antialias=True), v2.RandomHorizontalFlip()]
        )


class TorchvisionRecipeAugmentation(ImageAugmentation):
    """The training transform of torchvision's classification references (ResNet-50 IMAGENET1K_V2): a random
    resized crop and a flip, TrivialAugmentWide, both with bilinear interpolation, and a random erasing with
    probability `erasing_p`, all in the workers (each is per image: on the device, a loop over the batch).

    Args:
        area_range: the crop's share of the image's area.
        trivial_augment: apply TrivialAugmentWide.
        erasing_p: probability of the random erasing (0.1 in the recipe; 0 for none).
    """

    def __init__(
        self, area_range: tuple[float, float] = (0.08, 1.0), trivial_augment: bool = True, erasing_p: float = 0.1
    ) -> None:
        self.area_range = tuple(area_range)
        self.trivial_augment = trivial_augment
        self.erasing_p = erasing_p

    def build(self, crop_size: int) -> nn.Module:
        bilinear = v2.InterpolationMode.BILINEAR
        steps = [
            v2.RandomResizedCrop(crop_size, scale=self.area_range, interpolation=bilinear, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if self.trivial_augment:
            steps.append(v2.TrivialAugmentWide(interpolation=bilinear))
        if self.erasing_p > 0:
            # torchvision erases the normalised image to 0, i.e. to the mean; the uint8 crop is erased to the mean
            # pixel rounded to a level (at most half a level off), with torchvision's distribution of rectangles.
            steps.append(v2.RandomErasing(p=self.erasing_p, value=list(IMAGENET_MEAN_PIXEL)))
        return v2.Compose(steps)


class TenCropViews(nn.Module):
    """The 4 corner and the centre crops of an image and of its mirror image, stacked: [10, C, size, size]."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: Tensor) -> Tensor:
        return torch.stack(TF.ten_crop(image, [self.size, self.size]))


class MultiScaleViews(nn.Module):
    """The whole image with its shorter side at each scale, and the mirror of each: a list of 2 x len(scales)."""

    def __init__(self, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.scales = scales

    def forward(self, image: Tensor) -> list[Tensor]:
        views = []
        for scale in self.scales:
            resized = TF.resize(image, [scale], antialias=True)
            views += [resized, TF.horizontal_flip(resized)]
        return views


def collate_view_lists(samples: list[tuple[list[Tensor], int]]) -> tuple[list[list[Tensor]], Tensor, int]:
    """Whole images at several scales differ in size: such a batch holds one list of views per image."""
    return [views for views, _ in samples], torch.tensor([label for _, label in samples]), NO_AUGMENTATION


class ImageFolderDataset(ImageFolder):
    """ImageFolder that decodes with `decoder` (at a reduced size where the transform shrinks the image anyway:
    `read_transformed`), names an unreadable image, or with `skip_corrupt` replaces it by the next one and counts it.

    The count lives in shared memory so that skips in DataLoader worker processes add up.
    """

    def __init__(
        self, root: str, transform: nn.Module, skip_corrupt: bool = False, decoder: Decoder = DEFAULT_DECODER
    ) -> None:
        super().__init__(root, transform=transform, loader=partial(read_rgb, decoder=decoder))
        self.skip_corrupt = skip_corrupt
        self.decoder = decoder
        self.skipped = multiprocessing.Value("l", 0)

    def __deepcopy__(self, memo: dict) -> "ImageFolderDataset":
        # A copy counts into the same shared counter (which cannot be copied); Lightning's EMAWeightAveraging
        # deep-copies the LightningModule, and with it whatever reaches this dataset.
        copy = type(self).__new__(type(self))
        memo[id(self)] = copy
        for key, value in self.__dict__.items():
            setattr(copy, key, value if key == "skipped" else deepcopy(value, memo))
        return copy

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = read_transformed(path, self.transform, self.decoder)
            except (RuntimeError, ValueError, OSError) as err:
                if not self.skip_corrupt:
                    raise DataError(
                        f"cannot decode image {path} ({err}); replace or delete it, or set --data.skip_corrupt true"
                    ) from err
                with self.skipped.get_lock():
                    self.skipped.value += 1
                warnings.warn(f"skipped unreadable image {path}", stacklevel=1)
                continue
            return image, target
        raise DataError(f"no image under {self.root} could be decoded")


def class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DatasetNotFoundError(f"{split_dir} does not exist: {LAYOUT_HELP}")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{split_dir} holds no class folders: {LAYOUT_HELP}")
    return classes


class ImageNetDataModule(ClassificationDataModule):
    """ImageNet-1k or any ImageFolder-layout subset (e.g. Imagenette); the classes follow the folders.

    Args:
        root: folder holding `train/` and `val/`; default `$RESNET_LAB_DATA/imagenet`, else `./data/imagenet`.
        batch_size: the global batch (the paper's 256), split evenly over all devices and nodes.
        train_augmentation: the recipe's training augmentation (`ImageAugmentation`): its per-image part in the
            workers, its batch part on the device; None: the paper's (`PaperAugmentation`, shorter side 256-480,
            random crop, flip, PCA colour noise); `InceptionAugmentation` for RandomResizedCrop.
        crop_size: training and evaluation crop (224 in the paper; smaller makes research runs cheaper).
        eval_crop_size: the evaluation crop, if another (torchvision's recipe trains at 176 and evaluates at 224).
        val_resize: shorter side before the centre crop or the ten crops.
        eval_mode: how `validate` and `test` view each image: "center" (one centre crop), "ten_crop" (4 corners
            + centre and their flips, softmax averaged; Tables 2-3), "multi_scale" (the whole image fully
            convolutionally at each of `test_scales` and flipped, softmax averaged; Table 4).
        test_scales: shorter sides of the "multi_scale" mode.
        skip_corrupt: replace unreadable images by the next readable one and report how many, instead of stopping.
        decoder: how JPEGs are decoded: "simplejpeg" (libjpeg-turbo, at 1/2, 1/4 or 1/8 of the size where the first
            step of the transform shrinks the image at least that much: the same crops, to resampling error), "pil"
            (the same through PIL, slower), "torchvision" (torchvision.io, always the whole image).
        num_workers: decoding processes; None follows the machine.
        augmentations: applied in order to every training batch on the device, after `train_augmentation`'s own
            (the same `BatchAugmentation`s as CIFAR's, e.g. the presets' `EachImage`); None or [] for none.
        mixing: mixes every training batch and its labels after the normalisation (`MixBatch` with mixup, cutmix
            or a `RandomChoice` of both), one draw per iteration from (seed, epoch, iteration); None for none.
        repeated_augmentations: copies of each image per epoch, dealt out over the processes
            (`RepeatedAugmentationSampler`; 4 in torchvision's recipe); 1 for plain shuffling.

    The workers decode, resize and crop, and hand over uint8 images (a quarter of float32's host-to-device
    traffic); everything else happens on the device after the transfer, to every batch alike: the training
    augmentation's batch part, `augmentations`, the normalisation, `mixing` (`ClassificationDataModule`).
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        train_augmentation: ImageAugmentation | None = None,
        crop_size: int = 224,
        val_resize: int = 256,
        eval_mode: EvalMode = "center",
        test_scales: tuple[int, ...] = PAPER_TEST_SCALES,
        skip_corrupt: bool = False,
        num_workers: int | None = None,
        eval_crop_size: int | None = None,
        augmentations: list[BatchAugmentation] | None = None,
        mixing: MixBatch | None = None,
        repeated_augmentations: int = 1,
        decoder: Decoder = DEFAULT_DECODER,
    ) -> None:
        super().__init__(batch_size, num_workers, augmentations or [], mixing)
        self.eval_crop_size = crop_size if eval_crop_size is None else eval_crop_size
        if val_resize < self.eval_crop_size:
            raise ConfigError(f"val_resize {val_resize} must be at least the evaluation crop {self.eval_crop_size}")
        if repeated_augmentations < 1:
            raise ConfigError(f"repeated_augmentations must be at least 1, got {repeated_augmentations}")
        self.repeated_augmentations = repeated_augmentations
        self.root = Path(root).expanduser() if root is not None else resolve_root(None) / "imagenet"
        self.classes = class_folders(self.root / "train")
        self.num_classes = len(self.classes)
        names = imagenet_class_names()
        self.class_names = [names.get(wnid, wnid) for wnid in self.classes]
        self.train_augmentation = train_augmentation or PaperAugmentation()
        self.train_augmentation.build(crop_size)  # a range that does not fit the crop: refused before any work
        self.crop_size = self.input_size = crop_size
        self.val_resize = val_resize
        self.eval_mode = eval_mode
        self.test_scales = tuple(test_scales)
        self.skip_corrupt = skip_corrupt
        if decoder not in get_args(Decoder):
            raise ConfigError(f"--data.decoder {decoder!r}: choose one of {', '.join(get_args(Decoder))}")
        if decoder == "simplejpeg" and simplejpeg_missing():
            raise ConfigError(
                "--data.decoder simplejpeg needs the simplejpeg package: pip install simplejpeg, or set "
                "--data.decoder pil (or torchvision)"
            )
        self.decoder = decoder
        self.normalize = imagenet_standardize()

    def train_transform(self) -> nn.Module:
        """The workers' part of the training augmentation: a decoded image to a uint8 crop."""
        return self.train_augmentation.build(self.crop_size)

    def data_augmentations(self) -> list[BatchAugmentation]:
        return self.train_augmentation.batch_augmentations()

    def eval_transform(self) -> nn.Module:
        """A decoded image to its uint8 evaluation view(s); the device normalises them, as it does training images."""
        if self.eval_mode == "multi_scale":
            return MultiScaleViews(self.test_scales)
        size = self.eval_crop_size
        crop = TenCropViews(size) if self.eval_mode == "ten_crop" else v2.CenterCrop(size)
        return v2.Compose([v2.Resize(self.val_resize, antialias=True), crop])

    def _folder(self, split: str, transform: nn.Module) -> ImageFolderDataset:
        split_dir = self.root / split
        if class_folders(split_dir) != self.classes:
            raise DatasetNotFoundError(f"{split_dir} must hold the same class folders as {self.root / 'train'}")
        return ImageFolderDataset(str(split_dir), transform, self.skip_corrupt, self.decoder)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = self._folder("train", self.train_transform())
        # The ILSVRC validation set doubles as the test set: the paper's tables report it.
        self.val_set = self.test_set = self._folder("val", self.eval_transform())

    def train_order(self, size: int) -> BatchOrder:
        if self.repeated_augmentations == 1:
            return super().train_order(size)
        repetitions, share = self.repeated_augmentations, self._share()
        return RepeatedAugmentationSampler(size, self.process_batch_size, repetitions, run_seed(), *share)

    def eval_collate_fn(self) -> Callable:
        return collate_view_lists if self.eval_mode == "multi_scale" else super().eval_collate_fn()

    @property
    def skipped_images(self) -> int:
        return sum(d.skipped.value for d in (self.train_set, self.val_set) if d is not None)

    def teardown(self, stage: str) -> None:
        if self.skipped_images:
            log.warning("skipped %d unreadable images under %s (skip_corrupt=True)", self.skipped_images, self.root)
