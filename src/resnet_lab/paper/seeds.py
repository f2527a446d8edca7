"""Run one experiment for several seeds, each into `logs/<config name>/seed<k>/`, fit then test.

Sequentially here, or printed as one command per seed for a cluster's job array (`--print-commands`).
"""

import shlex
import sys
from pathlib import Path

from resnet_lab.cli import LOG_DIR
from resnet_lab.cli import main as cli_main
from resnet_lab.errors import ConfigError


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
    option = "--trainer.logger.init_args.save_dir"
    save_dir = Path(extra[extra.index(option) + 1] if option in extra else LOG_DIR)
    done = [s for s in seeds if (save_dir / config.stem / f"seed{s}" / "config.yaml").exists()]
    if done and not print_commands:
        raise ConfigError(f"{save_dir / config.stem} already holds seeds {done}: choose other seeds or move them")
    for seed in seeds:
        args = seed_args(config, seed, extra)
        if print_commands:
            print(shlex.join([sys.executable, "main.py", *args]))
        else:
            cli_main(args)
