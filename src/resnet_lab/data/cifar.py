"""CIFAR-10 / CIFAR-100 from the standard python-version batches, with the paper's protocol (Sec. 4.2)."""

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets

from resnet_lab.data.augmentations import BatchAugmentation, MixBatch, PadCropFlip
from resnet_lab.data.base import DATA_ENV, fit_standardize, resolve_root, split_indices
from resnet_lab.data.batches import ImageSplit, InMemoryDataModule
from resnet_lab.data.imagenet import imagenet_standardize
from resnet_lab.errors import ConfigError, DataError, DatasetNotFoundError

# What a CIFAR batch file needs: numpy arrays and their dtypes (old and new numpy module names), and the byte
# strings that Python 3 pickles of protocol 2 encode through `_codecs.encode`. Nothing else may be called.
SAFE_PICKLE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asks for something other than numpy arrays and plain containers."""


class CifarUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that builds only numpy arrays and plain containers.

    A plain `pickle.load` runs whatever callable a file names, so a doctored batch file in a data folder could
    run any command when `fit` starts.
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise UnsafePickleError(f"it asks to load {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict:
    """One python-version CIFAR batch file as a dict, running no code from the file."""
    with path.open("rb") as f:
        entry = CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(entry, dict):
        raise TypeError(f"expected a dict of arrays, found a {type(entry).__name__}")
    return entry


def load_cifar_batches(
    folder: Path, files: tuple[str, ...], label_key: bytes, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Read python-version CIFAR batch files into uint8 images [N, 3, 32, 32] and int64 labels [N].

    Files are checked for shapes and label range rather than md5, so re-packed copies load.
    """
    images, labels = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise DatasetNotFoundError(f"{path} is missing: the CIFAR folder must hold {', '.join(files)}")
        try:
            entry = read_cifar_pickle(path)
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            batch_labels = np.asarray(entry[label_key], dtype=np.int64)
        except UnsafePickleError as err:
            raise DataError(
                f"{path} is not a plain CIFAR batch and was not loaded: {err}. Replace it with the official file"
            ) from err
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"{path} is not a readable CIFAR batch ({type(err).__name__}: {err}); "
                "delete the folder and download it again"
            ) from err
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch_labels) != len(data):
            raise DataError(
                f"{path}: expected data of shape [N, 3072] and N labels, "
                f"got data {list(data.shape)} and {len(batch_labels)} labels"
            )
        if len(batch_labels) and not 0 <= batch_labels.min() <= batch_labels.max() < num_classes:
            raise DataError(
                f"{path}: labels must lie in [0, {num_classes}), found {batch_labels.min()}..{batch_labels.max()}"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class CIFAR10DataModule(InMemoryDataModule):
    """CIFAR-10 with the paper's protocol: 45k / 5k train / validation split, 4-pixel pad + random crop + flip,
    per-pixel mean subtraction; the 10k test set for `test` and `predict`.

    Args:
        root: folder holding `cifar-10-batches-py/`; default `$RESNET_LAB_DATA`, else `./data`.
        batch_size: the global batch (the paper's 128), split evenly over all devices and nodes.
        val_size: images held out of the 50k training set for validation (the paper's 5k). 0 trains on all
            50k and validates on the test set, as the most widely used public reimplementation does.
        split_seed: seed of the fixed train / validation split.
        normalization: "pixel_mean" subtracts the per-pixel mean image of the train split (the paper);
            "channel" subtracts the per-channel mean and divides by the per-channel std of the train split;
            "imagenet" uses the fixed ImageNet mean and std, as the published option-A CIFAR weights expect.
        augmentations: applied in order to every training batch, on the device (`resnet_lab.data.augmentations`);
            None: the paper's, `PadCropFlip(4)` (pad 4, random 32x32 crop, horizontal flip); [] for none.
        num_workers: loader processes; None follows the machine.
        download: fetch the dataset with torchvision when the folder is missing.
        test_range: [start, stop) of the test images to use; None: all. (A re-packed test set whose later
            images are lossy copies can be restricted to its exact ones.)
        loader: "device" keeps each split on the training device as uint8 (fast; no worker processes);
            "dataloader" keeps it in host memory and copies each batch over from `num_workers` processes. Both give
            the same batches and augment them in the same place.
        seed: base seed of the per-epoch shuffle and the augmentation draws; None (the default) follows
            the run's `seed_everything`, so runs of different seeds differ in training order and augmentation
            as well as in their initial weights (the split stays fixed by `split_seed`).
        mixing: mixes every training batch and its labels after the normalisation (`MixBatch` of torchvision's
            `MixUp` or `CutMix`: configs/presets/mixup.yaml, cutmix.yaml), one draw per global batch; None for none.
    """

    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = b"labels"
    meta_file, names_key = "batches.meta", b"label_names"
    num_classes = 10
    input_size = 32
    torchvision_class = datasets.CIFAR10

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        split_seed: int = 0,
        normalization: Literal["pixel_mean", "channel", "imagenet"] = "pixel_mean",
        augmentations: list[BatchAugmentation] | None = None,
        num_workers: int | None = None,
        download: bool = True,
        test_range: tuple[int, int] | None = None,
        loader: Literal["device", "dataloader"] = "device",
        seed: int | None = None,
        mixing: MixBatch | None = None,
    ) -> None:
        augmentations = [PadCropFlip(4)] if augmentations is None else augmentations
        super().__init__(batch_size, num_workers, augmentations, loader, seed, mixing)
        self.root = resolve_root(root)
        if self.root.is_file():
            raise ConfigError(f"--data.root {self.root} is a file: give the folder that holds {self.folder}/")
        if (self.root / self.train_files[0]).is_file() or self.root.name == self.folder:
            raise ConfigError(
                f"--data.root {self.root} is the {self.folder} folder itself: give the folder that holds it, "
                f"--data.root {self.root.parent}"
            )
        self.val_size = val_size
        self.split_seed = split_seed
        self.normalization = normalization
        self.download = download
        self.test_range = test_range

    @property
    def data_dir(self) -> Path:
        return self.root / self.folder

    def prepare_data(self) -> None:
        if self.data_dir.is_dir():
            return
        if (self.root / "train").is_dir() and (self.root / "val").is_dir():  # never download into another dataset
            raise ConfigError(
                f"--data.root {self.root} holds an ImageFolder dataset (train/, val/), not {self.folder}/: give the "
                f"folder that holds {self.folder}/, or use an ImageNet config for it (configs/resnet18_imagenette.yaml)"
            )
        if not self.download:
            raise DatasetNotFoundError(
                f"no {self.torchvision_class.__name__} found: looked for {self.data_dir.resolve()}. Point "
                f"--data.root (or ${DATA_ENV}) at the folder that holds {self.folder}/, or set --data.download true"
            )
        try:
            self.torchvision_class(str(self.root), train=True, download=True)
        except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), a full disk, a bad archive
            reason = str(getattr(err, "reason", None) or err).splitlines()[0][:200]
            raise DatasetNotFoundError(
                f"no {self.folder}/ under {self.root.resolve()}, and downloading it failed ({reason}). Copy "
                f"{self.folder}/ there, or point --data.root (or ${DATA_ENV}) at the folder that holds it"
            ) from err

    def setup(self, stage: str | None = None) -> None:
        if not self.data_dir.is_dir():
            self.prepare_data()
        images, labels = load_cifar_batches(self.data_dir, self.train_files, self.label_key, self.num_classes)
        train_idx, val_idx = split_indices(len(labels), self.val_size, self.split_seed)
        if self.normalization == "imagenet":
            normalize = imagenet_standardize()
        else:
            normalize = fit_standardize(images[train_idx], per_pixel=self.normalization == "pixel_mean")
        self.train_set = ImageSplit(images[train_idx], labels[train_idx])
        test_images, test_labels = load_cifar_batches(self.data_dir, self.test_files, self.label_key, self.num_classes)
        if self.test_range is not None:
            start, stop = self.test_range
            if not 0 <= start < stop <= len(test_labels):
                raise ConfigError(
                    f"test_range {list(self.test_range)} must be [start, stop) with 0 <= start < stop <= "
                    f"{len(test_labels)}, the test set's size"
                )
            test_images, test_labels = test_images[start:stop], test_labels[start:stop]
        self.test_set = ImageSplit(test_images, test_labels)
        if self.val_size:
            self.val_set = ImageSplit(images[val_idx], labels[val_idx])
        else:
            self.val_set = self.test_set
        self.normalize = normalize
        self.class_names = read_class_names(self.data_dir / self.meta_file, self.names_key, self.num_classes)


def read_class_names(path: Path, key: bytes, num_classes: int) -> list[str] | None:
    """The class names of a CIFAR folder's meta file (`batches.meta`, `meta`), running no code from it; None where
    it is missing or does not hold `num_classes` names (they only label figures and tables)."""
    try:
        names = read_cifar_pickle(path)[key] if path.is_file() else None
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError):
        return None
    if not isinstance(names, list) or len(names) != num_classes:
        return None
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) through the same code; `root` holds `cifar-100-python/`."""

    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = b"fine_labels"
    meta_file, names_key = "meta", b"fine_label_names"
    num_classes = 100
    torchvision_class = datasets.CIFAR100
