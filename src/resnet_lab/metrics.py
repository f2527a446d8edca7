"""Training metrics: each is one small class; the module logs every one as its mean over each logging window and
over each epoch.

A fork adds one (say top-5 training accuracy) with one config line, `model.train_metrics`, or one class here.
These are running sums kept on the device rather than torchmetrics objects: a torchmetrics update costs about
as much host time as a whole small CIFAR step on a GPU (docs/benchmarks.md), and the sums are read only on the
iterations the loggers write, so no iteration waits on the device.
"""

import torch
from torch import Tensor

from resnet_lab.errors import ConfigError


class TrainingMetric:
    """A training metric as the sum over a batch's images of a per-image value; logged as `train/<name>`, the mean
    per image. A metric with an `error_name` is an accuracy (a fraction) and is also logged as the error in percent,
    `train/<error_name>`: errors are only ever derived from accuracies."""

    name: str
    error_name: str | None = None

    def batch_sum(self, logits: Tensor, labels: Tensor, loss: Tensor) -> Tensor:
        """The sum over the batch (a 0-d tensor on the batch's device). `loss` is the batch's mean loss."""
        raise NotImplementedError


class MeanLoss(TrainingMetric):
    """The training loss (`train/loss`)."""

    name = "loss"

    def batch_sum(self, logits: Tensor, labels: Tensor, loss: Tensor) -> Tensor:
        return loss.detach().float() * len(labels)


class TopKAccuracy(TrainingMetric):
    """The fraction of images whose label is among the `k` highest logits (`train/acc_top<k>`), and its error
    in percent (`train/err_top<k>`, the paper's training curves for k = 1).

    Args:
        k: how many of the highest logits count.
    """

    def __init__(self, k: int = 1) -> None:
        self.k = k
        self.name = f"acc_top{k}"
        self.error_name = f"err_top{k}"

    def batch_sum(self, logits: Tensor, labels: Tensor, loss: Tensor) -> Tensor:
        logits = logits.detach()
        if self.k == 1:
            return (logits.argmax(dim=1) == labels).sum().float()
        top = logits.topk(min(self.k, logits.shape[1]), dim=1).indices
        return (top == labels[:, None]).any(dim=1).sum().float()


def default_training_metrics() -> list[TrainingMetric]:
    return [MeanLoss(), TopKAccuracy(1)]


class TrainingMeans:
    """Running sums of each metric over the current logging window (row 0) and the current epoch (row 1).

    A plain tensor, not a module buffer: DDP would overwrite every process's sums with rank 0's.
    """

    def __init__(self, metrics: list[TrainingMetric]) -> None:
        names = [m.name for m in metrics]
        if len(set(names)) != len(names):
            raise ConfigError(f"model.train_metrics must have distinct names, got {names}")
        self.metrics = metrics
        self.sums = torch.zeros(2, len(metrics))
        self.images = [0, 0]  # window, epoch

    def add(self, logits: Tensor, labels: Tensor, loss: Tensor) -> Tensor:
        """Add one batch's sums, on the device; returns its per-image means, in the order of `metrics`. Labels mixed
        into class probabilities (`MixBatch`) count as the class of the larger weight. Its images are counted by
        `count`, apart: a captured training step replays this, but not the host's arithmetic."""
        labels = labels.argmax(dim=1) if labels.ndim == 2 else labels
        values = torch.stack([m.batch_sum(logits, labels, loss) for m in self.metrics])
        if self.sums.device != values.device:
            self.sums = self.sums.to(values.device)
        self.sums += values
        return values / len(labels)

    def count(self, images: int) -> None:
        """Count the images of the batch last added."""
        self.images = [self.images[0] + images, self.images[1] + images]

    def named(self, means: Tensor, prefix: str = "", suffix: str = "") -> dict[str, Tensor]:
        """`means` under the metrics' names, accuracies also as errors in percent."""
        logged = {}
        for metric, mean in zip(self.metrics, means.unbind(), strict=True):
            logged[f"{prefix}{metric.name}{suffix}"] = mean
            if metric.error_name:
                logged[f"{prefix}{metric.error_name}{suffix}"] = 100.0 * (1.0 - mean)
        return logged

    def take(self, row: int) -> Tensor:
        """The means of the window (0) or the epoch (1) so far, and start that row afresh."""
        means = self.sums[row] / max(self.images[row], 1)
        self.sums[row].zero_()
        self.images[row] = 0
        return means

    def state_dict(self) -> dict:
        return {"names": [m.name for m in self.metrics], "sums": self.sums.cpu(), "images": list(self.images)}

    def load_state_dict(self, state: dict) -> None:
        # Another set of metrics than the checkpoint's: its sums mean nothing here, start afresh.
        if state.get("names") == [m.name for m in self.metrics]:
            self.sums = state["sums"].clone().to(self.sums.device)
            self.images = list(state["images"])
