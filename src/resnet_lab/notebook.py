"""What TensorBoard shows of a run besides its scalars (docs/tensorboard.md): the images the network is given, the
paper's view of the run on one chart, and at test where the errors are.

All of it is read from the device once (at the first batch of a stage, or at the end of the test) and none of it
adds a host-device sync to a training iteration.
"""

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchmetrics.classification import MulticlassConfusionMatrix

from resnet_lab.data.augmentations import Standardize
from resnet_lab.files import atomic_write_csv

# The tags, as docs/tensorboard.md lists them.
SAMPLES = "samples/{stage}"
CONFUSION, PER_CLASS, WRONG = "test/confusion_matrix", "test/per_class_error", "test/confidently_wrong"
LOG10_LR = "lr/log10"
PER_CLASS_FILE = "test_per_class.csv"
STAGE_BATCHES = {
    "train": "training batch (after augmentation and mixing)", "val": "validation batch", "test": "test batch"
}  # fmt: skip
# Tags are regular expressions in a custom-scalars chart; anchored, so that `train/err_top1_epoch` stays out.
RUN_LAYOUT = {
    "the paper's view of the run": {
        "top-1 error (%): training (augmented batches) and validation": [
            "Multiline", ["^train/err_top1$", "^val/err_top1$"]
        ],
        "learning rate (log10)": ["Multiline", [f"^{LOG10_LR}$"]],
        "loss: training and validation": ["Multiline", ["^train/loss$", "^val/loss$"]],
    }
}  # fmt: skip
# Class names longer than this are cut in the figures (ImageNet's run to 40 characters).
NAME_CHARS = 22
# Views of different sizes (the multi-scale test) are shown as their centre square at this side.
SHOWN_SIDE = 224


def tensorboard_writers(trainer: Trainer) -> list[SummaryWriter]:
    """The SummaryWriters of the run's TensorBoard loggers, on the process that writes (none on the others)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def class_names(trainer: Trainer, num_classes: int) -> list[str]:
    """The data module's `class_names`, else the class numbers."""
    names = getattr(trainer.datamodule, "class_names", None)
    if names is None or len(names) != num_classes:
        return [str(i) for i in range(num_classes)]
    return [str(name) for name in names]


def short(names: Sequence[str]) -> list[str]:
    """Names as the figures show them: the first of a synset's synonyms ("tench, Tinca tinca"), cut at `NAME_CHARS`."""
    names = [name.split(",")[0].strip() or name for name in names]
    return [name if len(name) <= NAME_CHARS else f"{name[: NAME_CHARS - 1]}…" for name in names]


def as_pictures(images: Tensor | list, normalize: Standardize | None) -> Tensor | list:
    """A batch as the network gets it (normalised, in any precision) as pictures: float in [0, 1] on the host,
    `normalize` undone, or without one each image stretched to its own range."""
    if isinstance(images, list | tuple):
        return [as_pictures(views, normalize) for views in images]
    images = images.detach().float()
    if normalize is not None:
        images = normalize.inverse(images)
    else:
        low = images.flatten(-3).min(-1).values[..., None, None, None]
        high = images.flatten(-3).max(-1).values[..., None, None, None]
        images = (images - low) / (high - low).clamp_min(1e-12)
    return images.clamp(0, 1).cpu()


def normalization(trainer: Trainer) -> Standardize | None:
    """The data module's normalisation, where it has one (`ClassificationDataModule.normalize`)."""
    normalize = getattr(trainer.datamodule, "normalize", None)
    return normalize if isinstance(normalize, Standardize) else None


def is_image_batch(batch: Any) -> bool:
    """Whether a batch is (images, labels, ...) as the data modules here give it: images a tensor or lists of views."""
    return (
        isinstance(batch, tuple | list)
        and len(batch) >= 2
        and isinstance(batch[0], Tensor | list | tuple)
        and isinstance(batch[1], Tensor)
    )


def label_text(label: Tensor, names: Sequence[str]) -> str:
    """A class index as its name; mixed labels (class probabilities) as their two largest weights, a line each."""
    if label.ndim == 0:
        return names[int(label)]
    weights, classes = label.float().topk(min(2, len(label)))
    parts = [f"{names[int(c)]} {float(w):.2f}" for w, c in zip(weights, classes, strict=True) if float(w) >= 0.005]
    return "\n".join(parts)


def grid_figure(cells: list[tuple[Tensor, str]], columns: int, title: str) -> Figure:
    """Images [C, H, W] in [0, 1], each under its caption, `columns` to a row."""
    rows = max(1, math.ceil(len(cells) / columns))
    lines = max((caption.count("\n") + 1 for _, caption in cells), default=1)
    fig = Figure(figsize=(1.45 * columns, (1.4 + 0.15 * lines) * rows + 0.4))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, cells, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(caption, fontsize=6.5)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def samples_figure(images: Tensor | list, labels: Tensor, names: Sequence[str], count: int, title: str) -> Figure:
    """The first `count` images of a batch under their labels; an image with several views (ten crops, several
    scales) is a row of its views."""
    if isinstance(images, Tensor) and images.ndim == 4:
        cells = [(image, label_text(label, names)) for image, label in zip(images[:count], labels, strict=False)]
        return grid_figure(cells, min(8, len(cells)), title)
    per_image = [list(views) for views in images]
    columns = max(len(views) for views in per_image)
    shown = per_image[: max(1, count // columns)]
    cells = []
    for views, label in zip(shown, labels, strict=False):
        cells += [(view, label_text(label, names) if v == 0 else f"view {v + 1}") for v, view in enumerate(views)]
        cells += [(torch.ones(3, 1, 1), "")] * (columns - len(views))
    return grid_figure(cells, columns, title)


def shown_view(images: Tensor | list) -> Tensor:
    """One view of each image, all of one size: the image, its first view (ten crops), or the centre square of
    its first view at `SHOWN_SIDE` (whole images at several scales)."""
    if isinstance(images, Tensor):
        return images if images.ndim == 4 else images[:, 0]
    squares = [TF.center_crop(views[0], [min(views[0].shape[-2:])] * 2) for views in images]
    return torch.stack([TF.resize(s, [SHOWN_SIDE, SHOWN_SIDE], antialias=True) for s in squares])


class MostConfidentWrong:
    """The `k` test images classified wrong with the highest confidence so far, kept on the device: each batch is
    merged in with one `topk`, so no batch waits on the host."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.confidence: Tensor | None = None  # -1 marks an empty place
        self.predicted = self.label = self.images = None

    def add(self, log_probs: Tensor, labels: Tensor, images: Tensor) -> None:
        confidence, predicted = log_probs.detach().float().max(dim=1)
        confidence = confidence.exp().masked_fill(predicted == labels, -1.0)
        images = images.detach().float()
        if self.confidence is None:
            self.confidence = confidence.new_full((self.k,), -1.0)
            self.predicted = self.label = predicted.new_zeros(self.k)
            self.images = images.new_zeros(self.k, *images.shape[1:])
        confidence = torch.cat([self.confidence, confidence])
        top = confidence.topk(self.k).indices
        self.confidence = confidence[top]
        self.predicted = torch.cat([self.predicted, predicted])[top]
        self.label = torch.cat([self.label, labels])[top]
        self.images = torch.cat([self.images, images])[top]

    def gathered(self, pl_module: LightningModule) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """Every process's, the `k` most confident of them, on the host; wrong ones only. Called on every process."""
        if self.confidence is None:
            return None
        kept = (self.confidence, self.predicted, self.label, self.images)
        if pl_module.trainer.world_size > 1:
            kept = tuple(t.flatten(0, 1) for t in pl_module.all_gather(kept))
        confidence = kept[0]
        top = confidence.topk(min(self.k, len(confidence))).indices
        top = top[confidence[top] >= 0]
        return tuple(t[top].cpu() for t in kept)


class TensorBoardNotebook(Callback):
    """Figures and layouts for TensorBoard, logged by the run's TensorBoard loggers (docs/tensorboard.md):

    - `samples/train`, `samples/val`, `samples/test`: the first batch of each stage as the network gets it (after
      every augmentation and mixing), its normalisation undone, each image under its label (mixed labels as their
      two largest weights; ten crops and several scales as a row of views per image);
    - a custom-scalars layout (TensorBoard's CUSTOM SCALARS tab): training and validation top-1 error on one chart,
      the learning rate in log10 (`lr/log10`, at every logging step) beside it, and both losses;
    - at test: `test/confusion_matrix` (torchmetrics' `MulticlassConfusionMatrix` plot), `test/per_class_error`
      (the classes of highest error) with the table `test_per_class.csv` in the run folder, and
      `test/confidently_wrong`, the test images classified wrong with the highest confidence.

    Args:
        enabled: False logs none of it (one line: `--notebook.enabled false`).
        samples: images in each sample grid; 0 for none.
        layout: the custom-scalars layout and `lr/log10`.
        errors: the test's confusion matrix, per-class error and confidently-wrong grid.
        wrong: images in the confidently-wrong grid.
    """

    def __init__(
        self, enabled: bool = True, samples: int = 32, layout: bool = True, errors: bool = True, wrong: int = 16
    ) -> None:
        if samples < 0 or wrong < 1:
            raise ValueError(f"samples must be 0 or more and wrong 1 or more, got samples={samples}, wrong={wrong}")
        self.enabled, self.samples, self.layout, self.errors, self.wrong = enabled, samples, layout, errors, wrong
        self.shown: set[str] = set()
        self.lr_step = -1
        self.confusion: Tensor | None = None
        self.most_wrong = MostConfidentWrong(wrong)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.shown, self.lr_step = set(), -1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and self.layout:
            for writer in tensorboard_writers(trainer):
                writer.add_custom_scalars(RUN_LAYOUT)

    def _show_first(self, trainer: Trainer, stage: str, batch: Any, dataloader_idx: int = 0) -> None:
        if not self.enabled or not self.samples or stage in self.shown or dataloader_idx:
            return
        self.shown.add(stage)
        writers = tensorboard_writers(trainer)
        if not writers or not is_image_batch(batch):
            return
        images, labels = batch[0], batch[1]
        count = self.samples if isinstance(images, Tensor) and images.ndim == 4 else max(1, self.samples // 4)
        pictures = as_pictures(images[:count], normalization(trainer))
        labels = labels[:count].detach().cpu()
        num_classes = labels.shape[1] if labels.ndim == 2 else getattr(trainer.datamodule, "num_classes", None)
        names = short(class_names(trainer, int(num_classes or int(labels.max()) + 1)))
        what = STAGE_BATCHES[stage]
        title = f"the first {what} at iteration {trainer.global_step}, normalisation undone"
        for writer in writers:
            fig = samples_figure(pictures, labels, names, self.samples, title)
            writer.add_figure(SAMPLES.format(stage=stage), fig, global_step=trainer.global_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._show_first(trainer, "train", batch)
        # At the iterations the learning-rate monitor logs `lr-*` (Lightning writes after steps n-1, 2n-1, ...).
        step = trainer.global_step
        if self.enabled and self.layout and (step + 1) % trainer.log_every_n_steps == 0 and step != self.lr_step:
            self.lr_step = step  # once per optimizer step, however many micro-batches it accumulates
            lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 0.0
            if lr > 0 and trainer.is_global_zero:  # a host float: no device work
                for logger in trainer.loggers:
                    logger.log_metrics({LOG10_LR: math.log10(lr)}, step=step)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._show_first(trainer, "val", batch, dataloader_idx)

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._show_first(trainer, "test", batch, dataloader_idx)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.confusion, self.most_wrong = None, MostConfidentWrong(self.wrong)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not (self.enabled and self.errors) or dataloader_idx or not isinstance(outputs, dict):
            return
        log_probs = outputs.get("log_probs")
        if log_probs is None or not is_image_batch(batch):  # a fork's test step or batch of another kind
            return
        labels = batch[1]
        # Counted here rather than by MulticlassConfusionMatrix.update: its torch.bincount is a host sync per batch
        # on a GPU, and with deterministic algorithms it builds a [batch, classes^2] tensor (1 GB for ImageNet).
        classes = log_probs.shape[1]
        if self.confusion is None:
            self.confusion = torch.zeros(classes * classes, dtype=torch.long, device=log_probs.device)
        predicted = log_probs.argmax(dim=1)
        self.confusion.index_add_(0, labels * classes + predicted, torch.ones_like(labels))
        self.most_wrong.add(log_probs, labels, shown_view(batch[0]))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.confusion is None:
            return
        classes = math.isqrt(len(self.confusion))
        confusion = trainer.strategy.reduce(self.confusion, reduce_op="sum").view(classes, classes).cpu()
        wrong = self.most_wrong.gathered(pl_module)
        log_dir = trainer.log_dir  # on every process: it is a broadcast
        if not trainer.is_global_zero:
            return
        names = class_names(trainer, classes)
        if log_dir is not None:
            write_per_class(confusion, names, log_dir)
        step, names = trainer.global_step, short(names)
        for writer in tensorboard_writers(trainer):
            writer.add_figure(CONFUSION, confusion_figure(confusion, names), global_step=step)
            writer.add_figure(PER_CLASS, per_class_figure(confusion, names), global_step=step)
            if wrong is not None and len(wrong[0]):
                writer.add_figure(WRONG, wrong_figure(trainer, wrong, names), global_step=step)


def per_class_rows(confusion: Tensor, names: Sequence[str]) -> list[tuple]:
    """(class, name, images, errors, top-1 error %, most often predicted instead, how often) per class, from a
    confusion matrix [true, predicted]."""
    rows = []
    for c, counts in enumerate(confusion.tolist()):
        images = sum(counts)
        errors = images - counts[c]
        others = [(n, p) for p, n in enumerate(counts) if p != c]
        count, instead = max(others, default=(0, c))
        rows.append(
            (c, names[c], images, errors, round(100.0 * errors / images, 2) if images else "",
             names[instead] if count else "", count)
        )  # fmt: skip
    return rows


def write_per_class(confusion: Tensor, names: Sequence[str], folder: str | Path) -> Path:
    """`test_per_class.csv` in `folder` (the run's)."""
    header = ("class", "name", "images", "errors", "err_top1", "most_predicted_instead", "times")
    return atomic_write_csv(Path(folder) / PER_CLASS_FILE, header, per_class_rows(confusion, names))


def confusion_figure(confusion: Tensor, names: Sequence[str]) -> Figure:
    """torchmetrics' plot of the confusion matrix; with more than 20 classes without the counts and with a tick
    every tenth of them (a thousand labelled ticks would be unreadable)."""
    classes = len(names)
    fig = Figure(figsize=(7, 7) if classes <= 20 else (9, 9))
    ax = fig.subplots()
    small = classes <= 20
    with warnings.catch_warnings():  # matplotlib on the tensor torchmetrics hands it: a numpy 2 deprecation
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")
        MulticlassConfusionMatrix(classes).plot(
            val=confusion, ax=ax, add_text=small, labels=list(names) if small else None
        )
    if not small:
        ticks = list(range(0, classes, max(1, classes // 10)))
        ax.set_xticks(ticks, [str(t) for t in ticks], rotation=0, fontsize=8)
        ax.set_yticks(ticks, [str(t) for t in ticks], rotation=0, fontsize=8)
    ax.set_title("test confusion matrix (rows: true class, columns: predicted)", fontsize=10)
    fig.tight_layout()
    return fig


def per_class_figure(confusion: Tensor, names: Sequence[str], shown: int = 30) -> Figure:
    """Top-1 error per class, the `shown` classes of highest error, highest first."""
    tested = [row for row in per_class_rows(confusion, names) if row[2]]  # classes with test images
    rows = sorted(tested, key=lambda row: -row[4])[:shown]
    fig = Figure(figsize=(6, 0.6 + 0.22 * max(len(rows), 3)))
    ax = fig.subplots()
    ax.barh(range(len(rows)), [row[4] for row in rows], color="tab:red")
    ax.set_yticks(range(len(rows)), [f"{row[1]} ({row[2]})" for row in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("top-1 error (%)")
    what = "every class" if len(rows) == len(tested) else f"the {len(rows)} of highest error of {len(tested)}"
    what += "" if len(tested) == len(names) else f" with test images ({len(names)} classes)"
    ax.set_title(f"test error per class: {what} (images)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def wrong_figure(trainer: Trainer, wrong: tuple[Tensor, Tensor, Tensor, Tensor], names: Sequence[str]) -> Figure:
    confidence, predicted, label, images = wrong
    pictures = as_pictures(images.to(trainer.strategy.root_device), normalization(trainer))
    cells = [
        (picture, f"{names[int(t)]}\ntaken for {names[int(p)]} {float(c):.2f}")
        for picture, c, p, t in zip(pictures, confidence, predicted, label, strict=True)
    ]
    title = "the test images classified wrong with the highest confidence: true class, taken for (softmax)"
    return grid_figure(cells, min(8, len(cells)), title)
