"""Reading checkpoints with errors that name the file and the problem, instead of a trace from deep in torch, and
the rule that a checkpoint (or a run folder's saved config) is data: it may name only classes from a short list of
modules, since LightningCLI and `load_from_checkpoint` build every class a saved tree names (docs/security.md)."""

import importlib.util
import re
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from torch import nn

from resnet_lab.errors import ConfigError, DataError, DatasetNotFoundError
from resnet_lab.files import atomic_write

# Checkpoint names that Lightning resolves itself.
LIGHTNING_ALIASES = ("last", "best", "hpc", "registry")
# What a file from elsewhere may name for jsonargparse to build: networks, optimizers, schedules, data modules and
# transforms. Not `Lambda` (it calls whatever it is given), not the command line or the paper tools (they write
# files), not `os`, `subprocess`, `builtins` or any other module.
ALLOWED_MODULES = (
    "resnet_lab.models", "resnet_lab.data", "resnet_lab.module", "resnet_lab.metrics", "resnet_lab.schedules",
    "resnet_lab.callbacks", "torch.optim", "torch.nn", "torchvision.models", "torchvision.transforms.v2",
    "torchmetrics", "lightning.pytorch.loggers", "lightning.pytorch.callbacks",
)  # fmt: skip
REFUSED_NAMES = ("Lambda",)
# Lightning's own marker of a CLI-built module (`load_from_checkpoint` checks it against its own allow-list too).
LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _allowed(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    return attribute not in REFUSED_NAMES and any(
        module == allowed or module.startswith(f"{allowed}.") for allowed in ALLOWED_MODULES
    )


def _importable(name: str) -> bool:
    """Whether jsonargparse could import `name` (a dotted string in a Callable or type slot is imported)."""
    try:
        return importlib.util.find_spec(name.partition(".")[0]) is not None  # a top-level lookup runs no code
    except (ImportError, ValueError):
        return False


def check_plain(tree: object, source: str, key: str = "") -> None:
    """Refuse, in one line naming the key and the class, a saved tree (a checkpoint's hyper-parameters, a run's
    config) that names a class or function outside `ALLOWED_MODULES`, at any depth: `class_path` specs, and dotted
    strings that name something importable (jsonargparse imports those in Callable- and type-typed slots)."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            at = f"{key}.{name}" if key else str(name)
            if name == "_instantiator" and value == LIGHTNING_INSTANTIATOR:
                continue
            if name in ("class_path", "_class_path", "_instantiator") and not (
                isinstance(value, str) and DOTTED_NAME.fullmatch(value) and _allowed(value)
            ):
                raise DataError(_refusal(source, at, value))
            check_plain(value, source, at)
    elif isinstance(tree, list | tuple):
        for index, value in enumerate(tree):
            check_plain(value, source, f"{key}[{index}]")
    elif isinstance(tree, str) and DOTTED_NAME.fullmatch(tree) and _importable(tree) and not _allowed(tree):
        raise DataError(_refusal(source, key, tree))


def _refusal(source: str, key: str, value: object) -> str:
    return (
        f"{source}: {key} names {value!r}, which a file from elsewhere may not build (it is data: only classes of "
        "resnet_lab's models and data, torch.optim, torch.nn, torchvision.models and transforms.v2 but Lambda; "
        "docs/security.md lists them); if you trust it, put that setting in your own config"
    )


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents (tensors memory-mapped, so a large file costs little to check)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.ckpt"))
        hint = f": {', '.join(found[:3])}" if found else ""
        raise DatasetNotFoundError(f"checkpoint {path} is a folder: give a checkpoint file in it{hint}")
    if not path.is_file():
        raise DatasetNotFoundError(f"checkpoint {path} does not exist")
    try:
        # Memory-map the zip format (torch >= 1.6); older files, like the published CIFAR ones, load in full.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # truncated, foreign or not a torch file at all: say which and why
        reason = next(iter(str(err).splitlines()), "").split(". ")[0][:200]
        if path.stat().st_size == 0:
            reason = "an empty file"
        elif "Weights only load failed" in reason:  # torch's advice to unpickle anything is not ours to give
            reason = "not written by torch.save, or it holds objects other than tensors and plain values"
        raise DataError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {reason})") from err


def check_state_dict_matches(model: nn.Module, state: dict, source: str) -> None:
    """Explain, in one paragraph, how a state dict differs from `model` (missing, unexpected, reshaped weights)."""
    expected = model.state_dict()
    # BN fills in `num_batches_tracked` for checkpoints older than that buffer (e.g. the published CIFAR ones).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or reshaped):
        return
    parts = [
        f"{len(missing)} weights missing (e.g. {', '.join(missing[:2])})" if missing else "",
        f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})" if unexpected else "",
        f"{len(reshaped)} of another shape (checkpoint vs this model: {'; '.join(reshaped[:2])})" if reshaped else "",
    ]
    raise ConfigError(
        f"{source} does not fit this model: {', '.join(p for p in parts if p)}. Was it trained with another depth, "
        "residual unit (block), shortcut option, plain/residual switch or number of classes? Use the config it was "
        "trained with (its run folder's config.yaml)."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoints, each written to a temporary file in its own folder, flushed and renamed over
    the old one (`atomic_write`): a kill or a full disk during a write leaves the previous `last.ckpt` loadable,
    where Lightning's own atomic save stages the file in the system temp folder and, on another file system, copies
    it over the target. A full disk is one line naming the folder and its free space."""

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: object = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote file systems: fsspec's, as Lightning does
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))
        return None
