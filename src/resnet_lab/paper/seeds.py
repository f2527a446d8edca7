"""Run one experiment for several seeds, each into `logs/<config name>/seed<k>/`, fit then test.

Sequentially here, or printed as one command per seed for a cluster's job array (`--print-commands`).
"""

import shlex
import sys
from pathlib import Path

from resnet_lab.cli import main as cli_main


def seed_args(config: Path, seed: int, extra: list[str]) -> list[str]:
    return [
        "fit",
        "--config", str(config),
        "--seed_everything", str(seed),
        "--trainer.logger.init_args.name", config.stem,
        "--trainer.logger.init_args.version", f"seed{seed}",
        "--test_after_fit", "true",
        *extra,
    ]  # fmt: skip


def run_seeds(config: Path, seeds: list[int], extra: list[str], print_commands: bool = False) -> None:
    for seed in seeds:
        args = seed_args(config, seed, extra)
        if print_commands:
            print(shlex.join([sys.executable, "main.py", *args]))
        else:
            cli_main(args)
