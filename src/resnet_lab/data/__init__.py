from resnet_lab.data.augmentations import BatchAugmentation, BatchTransforms, EachImage, MixBatch, PadCropFlip
from resnet_lab.data.base import DATA_ENV, ClassificationDataModule
from resnet_lab.data.batches import InMemoryDataModule
from resnet_lab.data.cifar import CIFAR10DataModule, CIFAR100DataModule, load_cifar_batches
from resnet_lab.data.imagenet import (
    ImageAugmentation,
    ImageNetDataModule,
    InceptionAugmentation,
    PaperAugmentation,
    PCALighting,
    TorchvisionRecipeAugmentation,
)
from resnet_lab.data.synthetic import SyntheticDataModule

__all__ = [
    "DATA_ENV",
    "BatchAugmentation",
    "BatchTransforms",
    "InMemoryDataModule",
    "EachImage",
    "MixBatch",
    "PadCropFlip",
    "PaperAugmentation",
    "PCALighting",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassificationDataModule",
    "ImageAugmentation",
    "ImageNetDataModule",
    "InceptionAugmentation",
    "SyntheticDataModule",
    "TorchvisionRecipeAugmentation",
    "load_cifar_batches",
]
