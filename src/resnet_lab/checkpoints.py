"""Reading checkpoints with errors that name the file and the problem, instead of a trace from deep in torch, and
the rule that a checkpoint (or a run folder's saved config) is data: it may name only classes from a short list of
modules, since LightningCLI and `load_from_checkpoint` build every class a saved tree names (docs/security.md)."""

import importlib
import importlib.util
import inspect
import re
import sys
import zipfile
from collections.abc import Collection
from pathlib import Path

import torch
import yaml
from lightning.pytorch.plugins import TorchCheckpointIO
from torch import nn

from resnet_lab.errors import ConfigError, DataError, DatasetNotFoundError
from resnet_lab.files import atomic_write

# Checkpoint names that Lightning resolves itself.
LIGHTNING_ALIASES = ("last", "best", "hpc", "registry")
# What a file from elsewhere may name for jsonargparse to build: classes (never functions, but torchvision's model
# builders) defined in these modules, for networks, optimizers, schedules, training metrics, data modules and
# transforms. Not `Lambda` (it calls whatever it is given), not loggers or callbacks (they write files), nothing of
# `os`, `subprocess`, `builtins` or any other module.
ALLOWED_MODULES = (
    "resnet_lab.models", "resnet_lab.data", "resnet_lab.module", "resnet_lab.metrics", "resnet_lab.schedules",
    "torch.optim", "torch.nn", "torchvision.models", "torchvision.transforms.v2", "torchmetrics",
)  # fmt: skip
REFUSED_NAMES = ("Lambda",)
# Lightning's own marker of a CLI-built module (`load_from_checkpoint` checks it against its own allow-list too).
LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
# The checkpoint keys whose contents Lightning turns into constructor arguments (the last two: older versions').
HYPERPARAMETER_KEYS = ("hyper_parameters", "datamodule_hyper_parameters", "hparams", "module_arguments")
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
CONFIG_FILE = re.compile(r".*\.(ya?ml|json|jsonnet)", re.IGNORECASE)


def _in_allowed(module: str, trusted: Collection[str] = ()) -> bool:
    return any(module == allowed or module.startswith(f"{allowed}.") for allowed in (*ALLOWED_MODULES, *trusted))


def _allowed(name: str, trusted: Collection[str] = ()) -> bool:
    """Whether `name` is an allowed class (or one the user's own code names, `trusted`), resolved as jsonargparse
    resolves it but only through real modules (a text check alone would pass `torchmetrics.os.system`, which
    jsonargparse reaches as an attribute)."""
    if name in trusted:
        return True
    module_name, _, attribute = name.rpartition(".")
    if not _in_allowed(module_name, trusted):
        return False  # refused before anything is imported
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    target = getattr(module, attribute, None)
    if inspect.isclass(target):
        return target.__name__ not in REFUSED_NAMES and _in_allowed(target.__module__, trusted)
    return module_name == "torchvision.models" and attribute in torchvision_model_builders()


def torchvision_model_builders() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models())


def _named(text: str) -> bool:
    """Whether a string could name something jsonargparse imports (a dotted name whose first part is a module)."""
    if not DOTTED_NAME.fullmatch(text):
        return False
    top = text.partition(".")[0]
    try:
        return top in sys.modules or importlib.util.find_spec(top) is not None  # a top-level lookup runs no code
    except (ImportError, ValueError):
        return True


def check_plain(tree: object, source: str, key: str = "", trusted: Collection[str] = ()) -> None:
    """Refuse, in one line naming the key and the class, a saved tree (a checkpoint's hyper-parameters, a run's
    config) that names anything but an allowed class (`ALLOWED_MODULES`), at any depth: `class_path` specs, dotted
    strings (jsonargparse imports them in type and callable slots), specs written as YAML or JSON text, and config
    files named by path (jsonargparse reads both in place of a value). `trusted`: names and modules that the
    user's own code names (a fork's classes, as its config names them), allowed as well."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            at = f"{key}.{name}" if key else str(name)
            if name == "_instantiator" and value == LIGHTNING_INSTANTIATOR:
                continue
            if name in ("class_path", "_class_path", "_instantiator") and not (
                isinstance(value, str) and DOTTED_NAME.fullmatch(value) and _allowed(value, trusted)
            ):
                raise DataError(_refusal(source, at, value))
            check_plain(value, source, at, trusted)
    elif isinstance(tree, list | tuple):
        for index, value in enumerate(tree):
            check_plain(value, source, f"{key}[{index}]", trusted)
    elif isinstance(tree, str):
        if _named(tree) and not _allowed(tree, trusted):
            raise DataError(_refusal(source, key, tree))
        if CONFIG_FILE.fullmatch(tree.strip()) and Path(tree.strip()).is_file():
            raise DataError(f"{source}: {key} names the file {tree!r}, which would be read as a config: a file from "
                            "elsewhere cannot name a config")  # fmt: skip
        if any(c in tree for c in ":{["):
            try:
                parsed = yaml.safe_load(tree)
            except yaml.YAMLError:
                return
            if isinstance(parsed, dict | list):
                check_plain(parsed, source, key, trusted)


def check_checkpoint_plain(checkpoint: dict, source: str, trusted: Collection[str] = ()) -> None:
    """`check_plain` over every part of a checkpoint that Lightning builds objects from."""
    for name in HYPERPARAMETER_KEYS:
        if name in checkpoint:
            check_plain(checkpoint[name], source, "" if name == "hyper_parameters" else name, trusted)


def names_in(tree: object) -> set[str]:
    """The classes a tree of the user's own (a parsed config) names, and their modules: what `check_plain` then
    trusts in a checkpoint, so that a fork's own runs load with its own classes."""
    if isinstance(tree, dict):
        names = set().union(*(names_in(value) for value in tree.values()))
        path = tree.get("class_path")
        return names | ({path, path.rpartition(".")[0]} if isinstance(path, str) and "." in path else set())
    if isinstance(tree, list | tuple):
        return set().union(*(names_in(value) for value in tree))
    if inspect.isclass(tree):
        return {f"{tree.__module__}.{tree.__qualname__}", tree.__module__}
    if isinstance(tree, str) and DOTTED_NAME.fullmatch(tree):
        return {tree, tree.rpartition(".")[0]}
    return set()


def _refusal(source: str, key: str, value: object) -> str:
    return (
        f"{source}: {key} names {value!r}, which a file from elsewhere may not build (it is data: only classes of "
        "resnet_lab's models and data, torch.optim, torch.nn, torchvision.models and transforms.v2 but Lambda; "
        "docs/security.md lists them); if you trust it, name it in your own config, or in load_from_checkpoint's "
        "trusted_modules"
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
