"""Finished runs on disk (`logs/<experiment>/<version>/` folders with a config.yaml and TensorBoard events), and
how the reproduction commands write their figures and tables."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tb_logging
from torch.utils.tensorboard import SummaryWriter

from resnet_lab.checkpoints import check_plain, model_arguments, read_saved_config
from resnet_lab.errors import DataError, DatasetNotFoundError
from resnet_lab.files import atomic_write_csv
from resnet_lab.identity import stock_setting
from resnet_lab.launch import config_key

# A resumed or graph-logging run has several graph events; the reader warns of each, and only scalars are read here.
tb_logging.get_logger().setLevel("ERROR")
# The curves a run logs: its training error (of the training batches, with augmentation) and validation error.
TRAIN, VAL = "train/err_top1", "val/err_top1"


@dataclass(frozen=True)
class Run:
    path: Path

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def experiment(self) -> str:
        return self.path.parent.name

    @cached_property
    def config(self) -> dict:
        return read_saved_config(self.path / "config.yaml")

    def datamodule(self, root: str | None = None) -> LightningDataModule:
        """The run's data module, as its config built it (optionally with another data folder)."""
        data = self.config["data"]
        check_plain(data, f"{self.path / 'config.yaml'}: data", folder=self.path)  # a run folder from elsewhere: data
        init_args = {**data.get("init_args", {}), **({"root": root} if root else {})}
        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(LightningDataModule, "data")
        config = parser.parse_object({"data": {"class_path": data["class_path"], "init_args": init_args}})
        if "download" in config.data.init_args:  # reading a run's figures downloads nothing, anywhere
            config.data.init_args.download = False
        return parser.instantiate_classes(config).data

    @property
    def dataset(self) -> str:
        """`cifar10` for resnet_lab.data.CIFAR10DataModule: the data module's class without `DataModule`."""
        name = str(self.config.get("data", {}).get("class_path", "")).rsplit(".", 1)[-1]
        if not name.isidentifier():  # it names the ledger's file: a run folder from elsewhere is data
            raise DataError(f"{self.path / 'config.yaml'}: data.class_path does not end in a class name ({name!r})")
        return name.removesuffix("DataModule").lower() or name.lower()

    @property
    def paper_recipe(self) -> bool:
        """Whether the run trained the paper's recipe (`paper_recipe: false` in a recipe-switch preset's config)."""
        return bool(self.config.get("paper_recipe", True))

    @property
    def backbone(self) -> dict:
        """The network's class and settings, but those at the paper's own value (`stock_setting`)."""
        backbone = model_arguments(self.config)["backbone"]
        settings = {k: v for k, v in backbone.get("init_args", {}).items() if not stock_setting(k, v)}
        return {"class": backbone["class_path"].rsplit(".", 1)[-1], **settings}

    @cached_property
    def _events(self) -> EventAccumulator:
        return EventAccumulator(str(self.path), size_guidance={"scalars": 0}).Reload()  # 0: keep every point

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        """(step, value) of every point logged under `tag`, in order; empty if never logged."""
        if tag not in self._events.Tags()["scalars"]:
            return []
        return [(event.step, event.value) for event in self._events.Scalars(tag)]

    def last(self, tag: str) -> float | None:
        points = self.scalars(tag)
        return points[-1][1] if points else None


def find_runs(paths: list[Path]) -> list[Run]:
    """Every training run at or directly below each path (an experiment folder holds one run per version or seed).

    Folders without checkpoints/ below an experiment are not training runs and are left out: an evaluation of
    weights from elsewhere (an evaluation of a run's own checkpoint logs into that run).
    """
    runs = []
    for path in paths:
        if not path.exists():
            raise DatasetNotFoundError(f"{path} does not exist: give run folders, or experiment folders under logs/")
        if (path / "config.yaml").is_file():
            ckpt = config_key(path / "config.yaml", "ckpt_path")
            if ckpt and not (path / "checkpoints").is_dir():
                raise DatasetNotFoundError(
                    f"{path} is an evaluation of {ckpt} (main.py test or validate; no checkpoints/ of its own), not "
                    "a training run: give the run folder that trained those weights"
                )
            runs.append(Run(path))
            continue
        folders = sorted(p for p in path.glob("*") if (p / "config.yaml").is_file()) if path.is_dir() else []
        found = [p for p in folders if (p / "checkpoints").is_dir()]
        if not found:
            what = f" (only evaluations: {', '.join(p.name for p in folders)})" if folders else ""
            raise DatasetNotFoundError(
                f"no training run (a folder holding config.yaml and checkpoints/) at or below {path}{what}"
            )
        runs.extend(Run(p) for p in found)
    return runs


def save_figure(fig: Figure, out: Path) -> Path:
    """`out`.png, and the same figure in TensorBoard under `out`'s folder (`tensorboard --logdir <folder>`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=120)
    with SummaryWriter(str(out.parent / "tensorboard")) as writer:
        writer.add_figure(out.stem, fig, close=False)
    return png


def write_csv(out: Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    return atomic_write_csv(out.with_suffix(".csv"), header, rows)
