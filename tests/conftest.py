import os
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Under pytest-xdist each worker is a process of its own: one thread each, so that the workers share the cores
# rather than each spreading small operations over all of them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Command-line options that keep a test's run quiet: no progress bar, no model summary, no graph traced for TensorBoard,
# no TensorBoard figures (a second or two each to draw; test_notebook.py turns them back on).
QUIET = [
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.logger.init_args.log_graph", "false", "--notebook.enabled", "false",
]  # fmt: skip
IMAGENETTE_WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042")


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> None:
    """One batch file in the python-version CIFAR format (uint8 [N, 3072] in R|G|B planes)."""
    entry = {
        b"batch_label": b"test",
        label_key: labels,
        b"data": images.reshape(len(labels), -1),
        b"filenames": [b"x.png"] * len(labels),
    }
    with path.open("wb") as f:
        pickle.dump(entry, f)


# A few-iteration CIFAR run: what the reproduction commands' tests fit.
TINY_RUN = ["--data.val_size", "50", "--data.batch_size", "16", "--data.num_workers", "0",
            "--trainer.max_steps", "6", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.log_graph", "false",
            "--notebook.enabled", "false"]  # fmt: skip


def write_tiny_cifar(root: Path, images_per_batch: int = 40) -> Path:
    """`root`/cifar-10-batches-py in the real layout: 5 train batches and a test batch of random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = torch.randint(0, 10, (images_per_batch,), generator=g).tolist()
        images = torch.randint(0, 256, (images_per_batch, 3, 32, 32), generator=g).numpy().astype("uint8")
        write_cifar_batch(folder / name, images, labels)
    return root


class RunsACommand:
    """Unpickles to a call of os.system: what a doctored batch file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    """A small CIFAR-10 in the real on-disk layout: 5 train batches of 40 images, a test batch of 40."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(x) for x in rng.integers(0, 10, 40)]
        images = rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
        write_cifar_batch(folder / name, images, labels)
    return tmp_path


def write_tiny_imagenet(root: Path, train_per_class: int = 4, val_per_class: int = 2, classes: int = 6) -> Path:
    """A tiny ImageFolder tree of real JPEG files of random pixels under root/imagenet: `classes` ImageNet classes
    with `train_per_class` and `val_per_class` 40x48 images each."""
    import torch
    from torchvision.io import write_jpeg

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for wnid in IMAGENETTE_WNIDS[:classes]:
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=g)
                write_jpeg(image, str(folder / f"{wnid}_{i}.JPEG"))
    return root / "imagenet"


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    """6 ImageNet classes, 4 train and 2 val JPEGs each."""
    return write_tiny_imagenet(tmp_path)


@pytest.fixture
def shared_data() -> Path:
    """The real datasets (`$RESNET_LAB_DATA`, set by .ci/run to ../shared/data); skip where absent."""
    root = os.environ.get("RESNET_LAB_DATA")
    if not root or not (Path(root) / "cifar-10-batches-py").is_dir():
        pytest.skip("real CIFAR-10 not found: set RESNET_LAB_DATA to the folder holding cifar-10-batches-py")
    return Path(root)


def transformed(dm, loader) -> list:
    """Each batch of `loader` as (uint8 images as loaded, model input after the data module's transforms, labels)."""
    out = []
    for raw, labels, key in loader:
        images, labels = dm.on_after_batch_transfer((raw, labels, key), 0)
        out.append((raw, images, labels))
    return out


def data_class(config: Path) -> str:
    """The data module class a config uses, also when its recipe names it."""
    import yaml

    from resnet_lab.launch import expand_recipes

    files = expand_recipes(["--config", str(config)])[1::2]
    named = [yaml.safe_load(Path(f).read_text()).get("data", {}).get("class_path") for f in files]
    return [n for n in named if n][-1]


def subprocess_env(*paths: Path | str) -> dict[str, str]:
    """This process's environment with `paths` (default: the repository's src/) first on PYTHONPATH."""
    front = [str(p) for p in paths] or [str(REPO / "src")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*front, os.environ.get("PYTHONPATH")]))}


def quiet_trainer(tmp_path: Path, **kwargs):  # noqa: ANN201
    """A CPU Trainer without logger, checkpoints, progress bar or summary, unless `kwargs` says otherwise."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


class HostSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: reading a value (`.item()`, `bool()`,
    `int()`) or an op whose output shape depends on the data."""

    SYNCING = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "masked_select", "equal", "is_nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class SyncsPerIteration(L.Callback):
    """Host syncs of each iteration, recorded without a gap from the start of training: the ops from one
    iteration's on_train_batch_end (this callback's) to the next are the next iteration's, whatever the callbacks'
    order. That is the batch's fetch, transfer and augmentation, every callback's hooks and the step, and also what
    Lightning does after an iteration's hooks: the loggers' writes of a logging iteration fall in the iteration
    after it, and the first iteration of an epoch holds the epoch's set-up (its order of batches)."""

    def __init__(self) -> None:
        self.per_step: dict[int, list[str]] = {}
        self.mode: HostSyncs | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.mode = HostSyncs()
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.per_step[trainer.global_step], self.mode.ops = self.mode.ops, []

    def on_train_end(self, trainer, pl_module) -> None:
        self.mode.__exit__(None, None, None)

    def between_logging(self, logging_steps: set[int]) -> dict[int, list[str]]:
        """The syncs of the iterations that are neither a logging iteration, nor the one after it, nor the first."""
        after = {step + 1 for step in logging_steps}
        return {s: ops for s, ops in self.per_step.items() if ops and s not in logging_steps | after | {1}}
