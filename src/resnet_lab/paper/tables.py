"""Tables 2, 3 and 6: finished runs gathered into a Markdown table beside the paper's numbers.

Each experiment folder (`logs/<config>/`) is one row; its runs (one per seed) give the mean +/- std and the best
of their final `test/err_top1` (and `test/err_top5` where logged), which `--test_after_fit true` or a later
`python main.py test` writes.
"""

import json
import statistics
from collections import Counter
from pathlib import Path

from resnet_lab.checkpoints import read_checkpoint
from resnet_lab.files import atomic_write_text, markdown_cell
from resnet_lab.paper.runs import Run

# (backbone class, depth, residual, shortcut) -> (top-1, top-5) test error %; None where the paper gives none.
PAPER_ERRORS: dict[tuple[str, int, bool, str], tuple[float, float | None]] = {
    # Table 6, CIFAR-10 (option A); ResNet-110 is the paper's best of 5 runs (mean 6.61 +/- 0.16).
    **{
        ("CifarResNet", d, True, "A"): (e, None)
        for d, e in {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}.items()
    },
    # Tables 2 and 3, ImageNet validation, 10-crop.
    ("ImageNetResNet", 18, False, "A"): (27.94, None),
    ("ImageNetResNet", 34, False, "A"): (28.54, 10.02),
    ("ImageNetResNet", 18, True, "A"): (27.88, None),
    ("ImageNetResNet", 34, True, "A"): (25.03, 7.76),
    ("ImageNetResNet", 34, True, "B"): (24.52, 7.46),
    ("ImageNetResNet", 34, True, "C"): (24.19, 7.40),
    ("ImageNetResNet", 50, True, "B"): (22.85, 6.71),
    ("ImageNetResNet", 101, True, "B"): (21.75, 6.05),
    ("ImageNetResNet", 152, True, "B"): (21.43, 5.71),
}


# The data the paper's figures are for (data set, classes): none is beside a run on other data (synthetic images,
# an ImageNet subset such as imagenette).
PAPER_DATA = {"CifarResNet": ("cifar10", 10), "ImageNetResNet": ("imagenet", 1000)}


def paper_errors(backbone: dict, dataset: str) -> tuple[float, float | None] | None:
    """The paper's (top-1, top-5) test error % for this network on this data set, if it gives one."""
    data, classes = PAPER_DATA.get(backbone["class"], (None, None))
    if data != dataset or backbone.get("num_classes", classes) != classes:
        return None
    if backbone.get("norm_layer") or backbone.get("attn_layer"):  # not BN, or with attention: not the paper's net
        return None
    residual = backbone.get("residual", True)
    shortcut = backbone.get("shortcut", "A" if backbone["class"] == "CifarResNet" else "B")
    # Plain nets have no shortcuts: the option is irrelevant to them.
    return PAPER_ERRORS.get((backbone["class"], backbone.get("depth"), residual, shortcut if residual else "A"))


PAPER_UNITS = ("BasicBlock", "Bottleneck")  # named only when a network has another unit


def network_name(backbone: dict) -> str:
    """`ResNet-20 (A)`, `plain-34`, `ResNet-164 (A, PreActBottleneck)`; a network without a depth by its class."""
    if backbone.get("depth") is None:
        return backbone["class"]
    residual = backbone.get("residual", True)
    details = [str(backbone.get("shortcut", "?"))] if residual else []
    block = str(backbone.get("block") or "").rsplit(".", 1)[-1]
    if block and block not in PAPER_UNITS:
        details.append(block)
    for layer in ("norm_layer", "attn_layer"):  # present only when not the paper's (BN, no attention)
        if isinstance(backbone.get(layer), dict):
            details.append(str(backbone[layer].get("class_path", "?")).rsplit(".", 1)[-1])
    return f"{'ResNet' if residual else 'plain'}-{backbone['depth']}" + (f" ({', '.join(details)})" if details else "")


def mean_std(values: list[float]) -> str:
    """`7.51 ± 0.12` over several values, `7.51` for one, empty for none."""
    if not values:
        return ""
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def count_parameters(run: Run) -> int | None:
    """Learnable parameters of the run's network, read from its last checkpoint (BN running statistics excluded)."""
    checkpoints = sorted((run.path / "checkpoints").glob("last*.ckpt"))
    if not checkpoints:
        return None
    state = read_checkpoint(checkpoints[-1])["state_dict"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(v.numel() for k, v in state.items() if k.startswith("backbone.") and not k.endswith(buffers))


def _network(run: Run) -> str:
    """The run's network as its own saved config states it."""
    return json.dumps(run.backbone, sort_keys=True, default=str)


def results_table(runs: list[Run]) -> str:
    """One Markdown row per experiment: model, parameters, our top-1 (and top-5) error, best, runs, the paper's."""
    # One row per experiment and network, as each run's saved config states it: runs of one config with another
    # depth or switch get a row of their own, named by what differs.
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.experiment, _network(run)), []).append(run)
    variants = Counter(experiment for experiment, _ in groups)
    experiments: dict[str, list[Run]] = {}
    for (experiment, network), group in groups.items():
        if variants[experiment] == 1:
            experiments[experiment] = group
            continue
        others = [json.loads(n) for e, n in groups if e == experiment and n != network]
        mine = json.loads(network)
        differs = sorted({k for other in others for k in {*mine, *other} if mine.get(k) != other.get(k)})
        experiments[f"{experiment} ({', '.join(f'{k}={mine.get(k)}' for k in differs)})"] = group
    header = [
        "experiment",
        "model",
        "params",
        "top-1 err. % (mean ± std)",
        "best",
        "top-5 err. %",
        "runs",
        "paper top-1",
        "paper top-5",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, group in experiments.items():
        finished = [r for r in group if r.last("test/err_top1") is not None]
        top1 = [r.last("test/err_top1") for r in finished]
        top5 = [v for v in (r.last("test/err_top5") for r in finished) if v is not None]
        backbone = group[0].backbone
        params = count_parameters(group[0])
        paper = paper_errors(backbone, group[0].dataset) if group[0].paper_recipe else None
        cells = [
            name,
            network_name(backbone),
            f"{params / 1e6:.2f}M" if params else "",
            mean_std(top1),
            f"{min(top1):.2f}" if top1 else "",
            mean_std(top5),
            f"{len(finished)}" + (f" (+{len(group) - len(finished)} untested)" if len(finished) < len(group) else ""),
            f"{paper[0]:.2f}" if paper else "",
            f"{paper[1]:.2f}" if paper and paper[1] is not None else "",
        ]
        lines.append("| " + " | ".join(markdown_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(runs: list[Run], out: Path) -> Path:
    path = out.with_suffix(".md")
    atomic_write_text(path, results_table(runs))
    return path
