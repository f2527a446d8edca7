"""Run one experiment for several seeds, each into `logs/<experiment>/seed<k>/`, fit then test.

Sequentially here, or printed as one command per seed for a cluster's job array (`--print-commands`).
"""

import shlex
import sys
from pathlib import Path

from resnet_lab.cli import LOG_DIR
from resnet_lab.cli import main as cli_main
from resnet_lab.errors import ConfigError
from resnet_lab.identity import run_name
from resnet_lab.launch import config_key
from resnet_lab.scaled import scale_given


def _option(extra: list[str], name: str, default: str) -> str:
    return extra[extra.index(name) + 1] if name in extra and extra.index(name) + 1 < len(extra) else default


def experiment_folder(config: Path, extra: list[str]) -> Path:
    """Where the command line writes this config's runs: `<save_dir>/<experiment>[-scale1of16]/`."""
    experiment = config_key(config, "experiment") or config.stem
    name = _option(extra, "--trainer.logger.init_args.name", None) or run_name(experiment, scale_given(extra))
    return Path(_option(extra, "--trainer.logger.init_args.save_dir", LOG_DIR)) / name


def seed_args(config: Path, seed: int, extra: list[str]) -> list[str]:
    return [
        "fit",
        "--config", str(config),
        "--seed_everything", str(seed),
        "--trainer.logger.init_args.version", f"seed{seed}",
        "--test_after_fit", "true",
        *extra,
    ]  # fmt: skip


def run_seeds(config: Path, seeds: list[int], extra: list[str], print_commands: bool = False) -> None:
    folder = experiment_folder(config, extra)
    done = [s for s in seeds if (folder / f"seed{s}" / "config.yaml").exists()]
    if done and not print_commands:
        raise ConfigError(f"{folder} already holds seeds {done}: choose other seeds or move them")
    for seed in seeds:
        args = seed_args(config, seed, extra)
        if print_commands:
            print(shlex.join([sys.executable, "main.py", *args]))
        else:
            cli_main(args)
