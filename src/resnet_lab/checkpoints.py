"""Reading checkpoints with errors that name the file and the problem, instead of a trace from deep in torch."""

import zipfile
from pathlib import Path

import torch
from torch import nn

from resnet_lab.errors import ConfigError, DataError, DatasetNotFoundError

# Checkpoint names that Lightning resolves itself.
LIGHTNING_ALIASES = ("last", "best", "hpc", "registry")


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
