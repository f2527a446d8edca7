"""Fig. 7: the standard deviation of every 3x3 layer's response, after BN and before the ReLU or the addition
(for pre-activation units, the 3x3 convolution's own output).

The std of a layer is taken over every element of its output (images, channels and positions) on the whole
evaluation set, accumulated in float64.
"""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn

from resnet_lab.errors import ConfigError
from resnet_lab.notebook import tensorboard_writers
from resnet_lab.paper.runs import save_figure, write_csv


def responses_of_3x3_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are the 3x3 layers' responses, in network order, as the network declares them
    (`response_layers()`: after BN for the original units, the 3x3 convs' own outputs for pre-activation ones)."""
    model = getattr(model, "backbone", model)  # an ImageClassifier, or the network itself
    declared = getattr(model, "response_layers", None)
    if not callable(declared):
        raise ConfigError(
            f"{type(model).__name__} does not declare which layers Fig. 7 measures: give it a response_layers() "
            "method returning those modules (see resnet_lab.models.ResNet)"
        )
    names = {module: name for name, module in model.named_modules()}
    return [(names[module], module) for module in declared()]


class ResponseStats:
    """Forward hooks that accumulate the count, sum and sum of squares of each 3x3 layer's response."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = responses_of_3x3_layers(model)
        self.sums = torch.zeros(len(self.layers), 3, dtype=torch.float64)
        self.handles: list = []

    def attach(self) -> None:
        """Start accumulating (from zero)."""
        self.detach()
        self.sums.zero_()
        for i, (_, layer) in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._hook(i)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> "ResponseStats":
        self.attach()
        return self

    def _hook(self, index: int):  # noqa: ANN202
        def accumulate(module: nn.Module, inputs: Any, output: Tensor) -> None:
            x = output.detach().double()
            if self.sums.device != x.device:  # accumulate where the responses are: no copy per batch
                self.sums = self.sums.to(x.device)
            self.sums[index] += torch.stack([x.new_tensor(x.numel()), x.sum(), x.square().sum()])

        return accumulate

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def std(self) -> Tensor:
        count, total, squares = self.sums.cpu().unbind(dim=1)
        mean = total / count
        return (squares / count - mean.square()).clamp_min(0).sqrt()

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.layers]


@torch.no_grad()
def layer_response_std(
    model: nn.Module, batches: Iterable, device: torch.device | str = "cpu"
) -> tuple[list[str], Tensor]:
    """Names and response std of every 3x3 layer of `model` in eval mode over `batches` of (images, labels)."""
    model.eval().to(device)
    with ResponseStats(model) as stats:
        for images, *_ in batches:
            model(images.to(device))
    return stats.names, stats.std()


def plot_responses(curves: dict[str, Tensor], out: Path) -> tuple[Path, Path]:
    """`responses_figure` as PNG, CSV and in TensorBoard."""
    fig, rows = responses_figure(curves)
    return save_figure(fig, out), write_csv(out, ("model", "layer", "rank_by_magnitude", "std"), rows)


def responses_figure(curves: dict[str, Tensor]) -> tuple[Figure, list[tuple]]:
    """The paper's Fig. 7 layout: std by layer index (top) and sorted by magnitude (bottom); and its points as rows
    (model, layer, rank by magnitude, std)."""
    fig = Figure(figsize=(7, 6))
    top, bottom = fig.subplots(2, 1)
    rows = []
    for color, (label, std) in zip(rcParams["axes.prop_cycle"].by_key()["color"] * 4, curves.items(), strict=False):
        ordered = sorted(std.tolist(), reverse=True)
        top.plot(range(1, len(std) + 1), std.tolist(), color=color, label=label)
        bottom.plot(range(1, len(std) + 1), ordered, color=color, label=label)
        rank = {i: r for r, i in enumerate(torch.argsort(std, descending=True).tolist(), 1)}
        rows += [(label, i + 1, rank[i], value) for i, value in enumerate(std.tolist())]
    top.set_title("Std of the 3x3 layers' responses (after BN, before ReLU or addition) on the test set")
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("response std")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are counted, not measured
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, rows


class LayerResponseMonitor(Callback):
    """During validation, measure Fig. 7's per-layer response std; log their mean as `responses/mean_std` and the
    figure to TensorBoard every `every_n_epochs` epochs."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = every_n_epochs
        self.stats: ResponseStats | None = None
        self.last_std: Tensor | None = None

    def _active(self, trainer: Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active(trainer):
            self.stats = ResponseStats(pl_module)
            self.stats.attach()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Hooks left on the network would keep measuring in whatever runs next in this process.
        if self.stats is not None:
            self.stats.detach()
            self.stats = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stats is None:
            return
        self.stats.detach()
        self.last_std = self.stats.std()
        self.stats = None
        pl_module.log("responses/mean_std", self.last_std.mean().item())
        for writer in tensorboard_writers(trainer):
            fig = Figure(figsize=(6, 3))
            ax = fig.subplots()
            ax.plot(range(1, len(self.last_std) + 1), self.last_std.tolist())
            ax.set_xlabel("3x3 layer index")
            ax.set_ylabel("response std")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            writer.add_figure("responses/std_by_layer", fig, global_step=trainer.global_step)
