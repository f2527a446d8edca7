"""Reproduce the paper's figures and tables from finished runs: `python -m resnet_lab.paper <command> --help`.

curves     Fig. 1 / Fig. 6: training and validation error against iterations (runs, or the ledger's curve files)
record     add finished, tested runs to the results ledger (results/<dataset>.csv, results/curves/)
results    the README's Results table from the ledger
responses  Fig. 7: std of every 3x3 layer's response, by layer and sorted
table      Tables 2, 3, 6: our errors (mean +/- std over seeds) beside the paper's
seeds      run a config for several seeds, fit then test
import-cifar   the published option-A CIFAR checkpoints as checkpoints of ours
export     a checkpoint's network as a torchvision state dict and/or safetensors
"""

import argparse
import sys
from pathlib import Path

from resnet_lab.errors import ConfigError, UserError


def _curves(args: argparse.Namespace) -> None:
    from resnet_lab.paper.curves import plot_curves, read_curves

    for path in plot_curves(read_curves(args.runs), args.out, args.title):
        print(f"wrote {path}")


def _record(args: argparse.Namespace) -> None:
    from resnet_lab.paper.ledger import record
    from resnet_lab.paper.runs import find_runs

    # A run folder named on the command line must be new; the runs found in an experiment folder may be recorded
    # already (a seed added since).
    named = [run.path for run in find_runs(args.runs)]
    found = {path for path in named if path not in args.runs}
    for line in record(named, args.ledger, skip_recorded=found):
        print(line)


def _results(args: argparse.Namespace) -> None:
    from resnet_lab.paper.ledger import read_ledger, results_table, write_readme

    rows = read_ledger(args.ledger)
    if not rows:
        raise ConfigError(
            f"no results in {args.ledger}/: add finished runs with `python -m resnet_lab.paper record <run folder>`"
        )
    table = results_table(rows)
    if args.readme:
        write_readme(args.readme, table)
        print(f"wrote the results table into {args.readme}")
    else:
        print(table, end="")


def _responses(args: argparse.Namespace) -> None:
    from resnet_lab.module import ImageClassifier
    from resnet_lab.paper.responses import layer_response_std, plot_responses
    from resnet_lab.paper.runs import Run

    curves = {}
    for number, checkpoint in enumerate(args.checkpoints, 1):
        # A deep net over the 10k test images takes minutes on a CPU: say what is being measured.
        print(f"[{number}/{len(args.checkpoints)}] measuring the layer responses of {checkpoint}", flush=True)
        run = Run(checkpoint.parent.parent)  # <run>/checkpoints/<file>.ckpt
        model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
        data = run.datamodule(root=args.data_root)
        data.setup("test")
        # The model's inputs: what the data module hands the model after its own batch transforms.
        batches = (data.on_after_batch_transfer(batch, 0) for batch in data.test_dataloader())
        if args.limit_batches:
            batches = [b for b, _ in zip(batches, range(args.limit_batches), strict=False)]
        net = model.backbone
        kind = "ResNet" if getattr(net, "residual", True) else "plain"
        curves[f"{kind}-{getattr(net, 'depth', '?')} ({run.name})"] = layer_response_std(
            model.backbone, batches, args.device
        )[1]
    for path in plot_responses(curves, args.out):
        print(f"wrote {path}")


def _table(args: argparse.Namespace) -> None:
    from resnet_lab.paper.runs import find_runs
    from resnet_lab.paper.tables import write_table

    path = write_table(find_runs(args.runs), args.out)
    print(path.read_text())
    print(f"wrote {path}")


def _seeds(args: argparse.Namespace, extra: list[str]) -> None:
    from resnet_lab.paper.seeds import run_seeds

    run_seeds(args.config, args.seeds, extra, args.print_commands)


def _import_cifar(args: argparse.Namespace) -> None:
    from resnet_lab.paper.weights import import_cifar_checkpoint

    depth = import_cifar_checkpoint(args.source, args.config, args.out)
    config = args.config or f"configs/resnet{depth}_cifar.yaml"
    print(
        f"wrote {args.out} (ResNet-{depth}); evaluate it with the normalisation these weights were trained with:\n"
        f"  python main.py test --config {config} --ckpt_path {args.out} --data.normalization imagenet"
    )


def _export(args: argparse.Namespace) -> None:
    from resnet_lab.paper.weights import export_weights

    if not (args.torchvision or args.safetensors):
        raise ConfigError("nothing to write: give --torchvision PATH and/or --safetensors PATH")
    export_weights(args.checkpoint, args.torchvision, args.safetensors)
    print("wrote " + " and ".join(str(p) for p in (args.torchvision, args.safetensors) if p))


class _OneLineErrors(argparse.ArgumentParser):
    """argparse prints the whole usage before a mistake; main.py prints one line, and so do these commands."""

    def error(self, message: str) -> None:
        sys.exit(f"error: {message} (`{self.prog} --help` lists the commands and their options)")


def parser() -> argparse.ArgumentParser:
    root = _OneLineErrors(
        prog="python -m resnet_lab.paper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True, parser_class=_OneLineErrors)

    curves = commands.add_parser("curves", help="Fig. 1 / 6 error curves")
    curves.add_argument(
        "runs", nargs="+", type=Path, help="run folders, experiment folders holding them, or curve files (.json)"
    )
    curves.add_argument("--out", type=Path, default=Path("logs/figures/fig6"), help="output path without suffix")
    curves.add_argument("--title", default="")
    curves.set_defaults(handler=_curves)

    records = commands.add_parser("record", help="add finished, tested runs to the results ledger")
    records.add_argument("runs", nargs="+", type=Path, help="run folders, or experiment folders holding them")
    records.add_argument(
        "--ledger", type=Path, default=Path("results"), help="the ledger folder (default: results); see its README.md"
    )
    records.set_defaults(handler=_record)

    results = commands.add_parser("results", help="the README's Results table from the ledger")
    results.add_argument("--ledger", type=Path, default=Path("results"), help="the ledger folder (default: results)")
    results.add_argument("--readme", type=Path, help="write the table into this README (between its markers)")
    results.set_defaults(handler=_results)

    responses = commands.add_parser("responses", help="Fig. 7 layer responses")
    responses.add_argument(
        "checkpoints", nargs="+", type=Path, help="checkpoints inside run folders (their config.yaml gives the data)"
    )
    responses.add_argument("--out", type=Path, default=Path("logs/figures/fig7"))
    responses.add_argument("--data-root", help="the data folder, if not the one the runs were trained with")
    responses.add_argument("--limit-batches", type=int, default=0, help="0: the whole test set")
    responses.add_argument("--device", default="cpu")
    responses.set_defaults(handler=_responses)

    table = commands.add_parser("table", help="Tables 2, 3, 6 as Markdown")
    table.add_argument("runs", nargs="+", type=Path, help="experiment folders (one row each) or run folders")
    table.add_argument("--out", type=Path, default=Path("logs/figures/table"))
    table.set_defaults(handler=_table)

    seeds = commands.add_parser("seeds", help="fit + test one config for several seeds; other options go to main.py")
    seeds.add_argument("config", type=Path)
    seeds.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    seeds.add_argument("--print-commands", action="store_true", help="print one command per seed instead")
    seeds.set_defaults(handler=_seeds)

    imports = commands.add_parser("import-cifar", help="a published option-A CIFAR checkpoint as ours")
    imports.add_argument("source", type=Path, help="e.g. resnet20-12fca82f.th")
    imports.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the experiment whose recipe the checkpoint records (default: configs/resnet<depth>_cifar.yaml)",
    )
    imports.add_argument("--out", type=Path, required=True)
    imports.set_defaults(handler=_import_cifar)

    export = commands.add_parser("export", help="a checkpoint's network as torchvision .pth / safetensors")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("--torchvision", type=Path)
    export.add_argument("--safetensors", type=Path)
    export.set_defaults(handler=_export)
    return root


def main(argv: list[str] | None = None) -> None:
    args, extra = parser().parse_known_args(argv)
    try:
        if args.command == "seeds":
            args.handler(args, extra)
        elif extra:
            parser().error(f"unrecognized arguments: {' '.join(extra)}")
        else:
            args.handler(args)
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
