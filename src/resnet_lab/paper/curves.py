"""Fig. 1 / Fig. 6: training error (thin) and validation error (bold) against iterations, from the runs' logs or
from the ledger's curve files (`results/curves/`)."""

import re
from dataclasses import dataclass
from pathlib import Path

from matplotlib import rcParams
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from resnet_lab.paper.ledger import curve_name, read_curve_file
from resnet_lab.paper.runs import TRAIN, VAL, Run, find_runs, save_figure, write_csv


@dataclass(frozen=True)
class Curve:
    """One run's errors (%) against iterations."""

    name: str
    backbone: dict
    train: list[tuple[int, float]]
    val: list[tuple[int, float]]

    @classmethod
    def of_run(cls, run: Run) -> "Curve":
        return cls(run.name, run.backbone, run.scalars(TRAIN), run.scalars(VAL))

    @classmethod
    def of_file(cls, path: Path) -> "Curve":
        """A curve file of the ledger, as `python -m resnet_lab.paper record` writes it."""
        curve = read_curve_file(path)
        name = f"{curve_name(curve)} seed {curve['seed']}"
        return cls(name, curve["backbone"], [tuple(p) for p in curve["train"]], [tuple(p) for p in curve["val"]])


def read_curves(paths: list[Path]) -> list[Curve]:
    """Curve files (`.json`) as they are, and the runs at or below every other path."""
    files = [Curve.of_file(p) for p in paths if p.suffix == ".json"]
    folders = [p for p in paths if p.suffix != ".json"]
    return files + [Curve.of_run(run) for run in (find_runs(folders) if folders else [])]


def plot_curves(curves: list[Curve], out: Path, title: str = "") -> tuple[Path, Path]:
    """Write `out`.png and `out`.csv (run, curve, step, error) and log the figure to TensorBoard beside them, with
    the curves as scalars under a custom-scalars layout of the figure's panels (`log_curves`)."""
    fig, rows = curves_figure(curves, title)
    log_curves(curves, out.parent / "tensorboard" / out.stem, title or out.stem)
    return save_figure(fig, out), write_csv(out, ("run", "curve", "step", "error_pct"), rows)


def panel(curve: Curve) -> str:
    return "residual" if curve.backbone.get("residual", True) else "plain"


def log_curves(curves: list[Curve], folder: Path, title: str) -> None:
    """Each curve as a TensorBoard run under `folder` (`<panel>/train_err`, `<panel>/val_err`), and a layout for the
    CUSTOM SCALARS tab with Fig. 6's panels, each one chart of its runs' training and validation error."""
    panels = sorted({panel(curve) for curve in curves})
    layout = {f"Fig. 6: {title}": {f"{kind} nets": ["Multiline", [f"^{kind}/"]] for kind in panels}}
    for stale in folder.glob("*/events.out.tfevents.*"):  # an earlier call's: its points would mix with these
        stale.unlink()
    used: set[str] = set()
    for curve in curves:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", curve.name).strip("_.") or "run"
        while name in used:  # two curves of one name (the same run given twice) stay apart
            name += "_"
        used.add(name)
        with SummaryWriter(str(folder / name)) as writer:
            writer.add_custom_scalars(layout)
            for suffix, points in (("train_err", curve.train), ("val_err", curve.val)):
                for step, value in points:
                    writer.add_scalar(f"{panel(curve)}/{suffix}", value, global_step=step)


def curves_figure(curves: list[Curve], title: str = "") -> tuple[Figure, list[tuple]]:
    """Fig. 6: plain and residual runs in separate panels, training error dashed and validation error bold against
    iterations; and its points as rows (run, curve, step, error)."""
    panels = {kind: [c for c in curves if panel(c) == kind] for kind in ("plain", "residual")}
    panels = {k: v for k, v in panels.items() if v}
    fig = Figure(figsize=(5.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)
    # The paper's axis is in units of 1e4 iterations; a short run reads better in plain iterations.
    last_step = max((step for c in curves for step, _ in (*c.train, *c.val)), default=0)
    unit, unit_label = (1e4, "iter. (1e4)") if last_step >= 1e4 else (1, "iterations")
    rows = []
    for ax, (kind, panel_runs) in zip(axes[0], panels.items(), strict=True):
        for color, curve in zip(rcParams["axes.prop_cycle"].by_key()["color"] * 4, panel_runs, strict=False):
            label = f"{'plain' if kind == 'plain' else 'ResNet'}-{curve.backbone.get('depth', '?')} ({curve.name})"
            for points, width, style, suffix in ((curve.train, 0.8, "--", "train"), (curve.val, 2.2, "-", "val")):
                rows += [(curve.name, suffix, step, value) for step, value in points]
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(
                        [s / unit for s in steps],
                        values,
                        style,
                        lw=width,
                        color=color,
                        marker="o" if len(points) == 1 else None,  # a line of one point draws nothing
                        label=label if suffix == "val" else None,
                    )
        ax.set_xlabel(unit_label)
        ax.set_title(f"{kind} nets" + (f": {title}" if title else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("error (%)  — dashed: training, bold: validation")
    fig.tight_layout()
    return fig, rows
