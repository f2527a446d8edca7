"""Fig. 1 / Fig. 6: training error (thin) and validation error (bold) against iterations, from the runs' logs."""

from pathlib import Path

from matplotlib import rcParams
from matplotlib.figure import Figure

from resnet_lab.paper.runs import Run, save_figure, write_csv

TRAIN, VAL = "train/err_top1", "val/err_top1"


def plot_curves(runs: list[Run], out: Path, title: str = "") -> tuple[Path, Path]:
    """Write `out`.png and `out`.csv (run, curve, step, error) and log the figure to TensorBoard beside them.

    Plain and residual runs go to separate panels, as in the paper's Fig. 6.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    panels = {
        "plain": [r for r in runs if not r.backbone.get("residual", True)],
        "residual": [r for r in runs if r.backbone.get("residual", True)],
    }
    panels = {k: v for k, v in panels.items() if v}
    fig = Figure(figsize=(5.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)
    rows = []
    for ax, (kind, panel_runs) in zip(axes[0], panels.items(), strict=True):
        for color, run in zip(rcParams["axes.prop_cycle"].by_key()["color"] * 4, panel_runs, strict=False):
            label = f"{'plain' if kind == 'plain' else 'ResNet'}-{run.backbone.get('depth', '?')} ({run.name})"
            for tag, width, style, suffix in ((TRAIN, 0.8, "--", "train"), (VAL, 2.2, "-", "val")):
                points = run.scalars(tag)
                rows += [(run.name, suffix, step, value) for step, value in points]
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(
                        [s / 1e4 for s in steps],
                        values,
                        style,
                        lw=width,
                        color=color,
                        label=label if suffix == "val" else None,
                    )
        ax.set_xlabel("iter. (1e4)")
        ax.set_title(f"{kind} nets" + (f": {title}" if title else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("error (%)  — dashed: training, bold: validation")
    fig.tight_layout()
    return save_figure(fig, out), write_csv(out, ("run", "curve", "step", "error_pct"), rows)
