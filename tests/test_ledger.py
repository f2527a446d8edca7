"""The results ledger end to end on tiny real runs: `--schedule_scale`, run.json, `record` (and its refusals),
`results`, curve files; and the committed ledger against the README."""

import csv
import json
import os
import re
import shlex
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace

from conftest import CONFIGS, REPO, TINY_RUN, write_tiny_cifar
from resnet_lab.cli import main as cli_main
from resnet_lab.errors import ConfigError
from resnet_lab.identity import run_name
from resnet_lab.launch import expand_recipes
from resnet_lab.paper.__main__ import main as paper
from resnet_lab.paper.curves import Curve
from resnet_lab.paper.ledger import COLUMNS, README_BEGIN, README_END, read_ledger, readme_table, results_table
from resnet_lab.paper.runs import Run
from resnet_lab.records import read_run_file
from resnet_lab.scaled import scale_label, scale_schedule

EXPERIMENTS = ("resnet20_cifar", "plain20_cifar")
SEEDS = (0, 1)


def merged_config(*files: Path) -> dict:
    """The configs' YAML merged in order, as the command line reads a recipe and the experiment over it."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    config: dict = {}
    for path in files:
        config = merge(config, yaml.safe_load(Path(path).read_text()))
    return config


def dict_to_namespace(config: dict) -> Namespace:
    return Namespace(**{k: dict_to_namespace(v) if isinstance(v, dict) else v for k, v in config.items()})


def experiment_config(name: str) -> dict:
    chain = expand_recipes(["--config", str(CONFIGS / f"{name}.yaml")])
    return merged_config(*chain[1::2])


def test_the_cifar_schedule_at_one_sixteenth_keeps_its_shape():
    config = dict_to_namespace(experiment_config("resnet20_cifar"))
    scale_schedule(config, 1 / 16)
    assert config.trainer.max_steps == 4000
    assert config.model.lr_scheduler.init_args.milestones == [2000, 3000]
    # Each epoch is 1/16 of the data, so the per-epoch validation falls 16x as often in iterations.
    assert config.trainer.limit_train_batches == 1 / 16
    assert config.trainer.max_epochs == -1


def test_a_warm_up_rule_is_left_as_the_paper_states_it():
    config = dict_to_namespace(experiment_config("resnet110_cifar"))
    warmup = config.model.lr_scheduler.init_args.get("warmup_steps")
    scale_schedule(config, 0.25)
    assert config.model.lr_scheduler.init_args.milestones == [8000, 12000]
    assert config.model.lr_scheduler.init_args.get("warmup_steps") == warmup
    assert [c["class_path"].rsplit(".", 1)[-1] for c in config.trainer.callbacks] == ["WarmupUntilTrainError"]


def test_an_epoch_schedule_keeps_its_epochs_and_an_iteration_validation_interval_scales():
    config = dict_to_namespace(experiment_config("resnet50_imagenet"))
    config.trainer.val_check_interval = 5000
    patience = config.model.lr_scheduler.init_args.patience
    scale_schedule(config, 1 / 16)
    assert config.trainer.max_steps == 600000 // 16
    assert config.trainer.val_check_interval == 312
    assert config.model.lr_scheduler.init_args.patience == patience  # in epochs (validations), which are kept


def test_a_schedule_whose_iteration_arguments_are_unknown_is_refused():
    config = dict_to_namespace(experiment_config("resnet20_cifar"))
    config.model.lr_scheduler = dict_to_namespace(
        {"class_path": "torch.optim.lr_scheduler.ExponentialLR", "init_args": {"gamma": 0.9999}}
    )
    with pytest.raises(ConfigError, match="cannot scale the learning-rate schedule .*ExponentialLR.*scaled_arguments"):
        scale_schedule(config, 0.5)
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        scale_schedule(dict_to_namespace(experiment_config("resnet20_cifar")), 2.0)


def test_scale_names():
    assert scale_label(0.0625) == "1/16" and scale_label(1.0) == "1"
    assert run_name("resnet20_cifar", 0.0625) == "resnet20_cifar-scale1of16"
    assert run_name("resnet20_cifar", 1.0) == "resnet20_cifar"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """ResNet-20 and plain-20, two seeds each, at half their schedule (TINY_RUN), fit + tested on the full test set and
    on a test_range, in a work folder of their own."""
    root = tmp_path_factory.mktemp("ledger")
    write_tiny_cifar(root / "data")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for experiment in EXPERIMENTS:
            config = CONFIGS / f"{experiment}.yaml"
            paper(["seeds", str(config), "--seeds", *map(str, SEEDS), "--schedule_scale", "0.5",
                   "--data.root", str(root / "data"), *TINY_RUN])  # fmt: skip
            for seed in SEEDS:
                run = Path("logs") / f"{experiment}-scale1of2" / f"seed{seed}"
                cli_main(["test", "--config", str(run / "config.yaml"), "--ckpt_path",
                          str(run / "checkpoints" / "last.ckpt"), "--data.test_range", "[0, 20]",
                          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    finally:
        os.chdir(cwd)
    return root


def run_folders(root: Path) -> list[Path]:
    return [root / "logs" / f"{e}-scale1of2" / f"seed{s}" for e in EXPERIMENTS for s in SEEDS]


@pytest.mark.slow
def test_a_scaled_run_trains_its_fraction_and_says_so(runs):
    run = Run(run_folders(runs)[0])
    info = read_run_file(run.path)
    assert info["schedule_scale"] == 0.5
    assert info["planned_iterations"] == info["iterations"] == 3  # TINY_RUN's 6 iterations, halved
    assert info["finished"] and info["wall_s"] > 0
    # config.yaml keeps the schedule as given, with its scale: run again, it trains the same 3 iterations.
    assert run.config["trainer"]["max_steps"] == 6 and run.config["schedule_scale"] == 0.5
    assert [step for step, _ in run.scalars("val/err_top1")] == [1, 2]  # each (halved) epoch of 2 iterations
    assert info["experiment"] == "resnet20_cifar"
    assert "trainer.max_steps=6" in info["overrides"] and "data.init_args.val_size=50" in info["overrides"]
    assert not any(
        o.startswith(("seed_everything", "schedule_scale", "data.init_args.root")) for o in info["overrides"]
    )
    assert info["versions"]["torch"] == torch.__version__
    assert info["device"].startswith("cpu: ") and info["precision"] == "32-true"
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?|unknown", info["commit"])
    subsets = {t["test_subset"]: t for t in info["tests"]}
    assert set(subsets) == {"full", "test_range [0, 20]"}
    assert all(t["step"] == 3 and t["weights"] in ("final", "last.ckpt") for t in info["tests"])


@pytest.mark.slow
def test_record_then_results(runs, tmp_path, capsys):
    ledger = tmp_path / "results"
    paper(["record", *map(str, run_folders(runs)), "--ledger", str(ledger)])
    assert capsys.readouterr().out.count("recorded ") == 4
    with (ledger / "cifar10.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert len(rows) == 8  # 4 runs x 2 test subsets
    for row in rows:
        run = Run(runs / "logs" / f"{row['experiment']}-scale1of2" / f"seed{row['seed']}")
        info = read_run_file(run.path)
        test = next(t for t in info["tests"] if t["test_subset"] == row["test_subset"])
        assert float(row["test_err_top1"]) == pytest.approx(test["metrics"]["test/err_top1"], abs=0.005)
        assert float(row["val_err"]) == pytest.approx(run.last("val/err_top1"), abs=0.005)
        assert (row["run_id"], row["schedule_scale"], row["iterations"]) == (info["run_id"], "0.5", "3")
        # The curve file beside the row: small, and the run's own logged errors.
        curve_file = ledger / row["curve"]
        assert curve_file.stat().st_size < 10_000
        curve = Curve.of_file(curve_file)
        assert curve.val == [(s, round(v, 2)) for s, v in run.scalars("val/err_top1")]
        assert [s for s, _ in curve.train] == [s for s, _ in run.scalars("train/err_top1")]

    paper(["results", "--ledger", str(ledger)])
    table = capsys.readouterr().out
    assert table == results_table(read_ledger(ledger))
    lines = table.splitlines()
    assert len(lines) == 2 + 4  # 2 experiments x 2 test subsets
    line = next(li for li in lines if "| resnet20_cifar (" in li and "| all |" in li)
    cells = [c.strip() for c in line.strip("|").split("|")]
    errors = [
        float(r["test_err_top1"]) for r in rows if r["experiment"] == "resnet20_cifar" and r["test_subset"] == "full"
    ]
    assert cells[5] == f"{statistics.mean(errors):.2f} ± {statistics.stdev(errors):.2f}"
    assert cells[6:8] == ["2", f"{min(errors):.2f}"]
    assert cells[3] == "1/2 (3 it.)" and cells[10] == "8.75"  # the paper's ResNet-20 beside ours
    assert "| 0–19 |" in table

    readme = tmp_path / "README.md"
    readme.write_text(f"# a fork\n\n{README_BEGIN}\nan old table\n{README_END}\n\nmore text\n")
    paper(["results", "--ledger", str(ledger), "--readme", str(readme)])
    assert readme_table(readme) == table
    assert readme.read_text().startswith("# a fork\n\n") and readme.read_text().endswith(f"{README_END}\n\nmore text\n")


@pytest.mark.slow
def test_record_refuses_a_run_twice_and_leaves_the_ledger_as_it_was(runs, tmp_path, capsys):
    ledger = tmp_path / "results"
    first, second = run_folders(runs)[:2]
    paper(["record", str(first), "--ledger", str(ledger)])
    before = (ledger / "cifar10.csv").read_text()
    with pytest.raises(SystemExit, match=rf"^error: {first} is already recorded in .*cifar10\.csv \(run [0-9a-f]+\)$"):
        paper(["record", str(second), str(first), "--ledger", str(ledger)])
    assert (ledger / "cifar10.csv").read_text() == before  # not even the other run went in

    # An experiment folder's runs: those already recorded are passed over, the others go in.
    capsys.readouterr()
    paper(["record", str(first.parent), "--ledger", str(ledger)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"skipped {first}: already recorded"
    assert out[1].startswith(f"recorded {second} in ") and len(out) == 2
    assert sorted(row["seed"] for row in read_ledger(ledger)) == ["0", "0", "1", "1"]  # 2 test subsets each


@pytest.mark.slow
def test_record_refuses_an_untested_run_and_a_folder_that_is_no_run(runs, tmp_path):
    run = run_folders(runs)[0]
    info = read_run_file(run)
    copy = tmp_path / "copy"  # the same run, before any test of it
    copy.mkdir()
    for name in ("config.yaml", "checkpoints"):
        os.symlink(run / name, copy / name)
    (copy / "run.json").write_text(json.dumps(info | {"tests": []}))
    with pytest.raises(SystemExit, match=r"^error: .*copy has no test of its final weights: `python main.py test "):
        paper(["record", str(copy), "--ledger", str(tmp_path / "results")])
    (copy / "run.json").unlink()
    with pytest.raises(SystemExit, match=r"^error: .*copy has no run.json"):
        paper(["record", str(copy), "--ledger", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()


def test_results_needs_a_ledger(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no results in .*: add finished runs with"):
        paper(["results", "--ledger", str(tmp_path)])


def test_the_readme_results_table_is_the_committed_ledger():
    """Every number in the README's Results table comes from a committed row."""
    committed = readme_table(REPO / "README.md")
    assert committed is not None, "README.md has lost its generated results table"
    assert committed == results_table(read_ledger(REPO / "results"))


def test_every_readme_figure_from_the_ledger_redraws_from_committed_curve_files(tmp_path):
    """The README's curve figures: their commands, run on the committed curve files, give the committed CSVs."""
    commands = re.findall(
        r"^(python -m resnet_lab\.paper curves results/\S.*)$", (REPO / "README.md").read_text(), re.M
    )
    assert commands, "the README shows no figure drawn from the ledger"
    for command in commands:
        args = shlex.split(command)[3:]
        out = Path(args[args.index("--out") + 1])
        files = [str(p) for pattern in args[1 : args.index("--out")] for p in sorted(REPO.glob(pattern))]
        assert files, f"{command}: no committed curve file matches"
        paper(["curves", *files, "--out", str(tmp_path / out.name)])
        assert (tmp_path / f"{out.name}.png").is_file()
        committed = (REPO / out).with_suffix(".csv").read_text()
        assert (tmp_path / f"{out.name}.csv").read_text() == committed


@pytest.mark.slow
def test_a_scaled_run_resumed_without_its_scale_is_refused(runs, tmp_path):
    last = run_folders(runs)[0] / "checkpoints" / "last.ckpt"
    refusal = r"^error: this checkpoint was trained with --schedule_scale 0.5 and is resumed with 1.0: resume it with"
    with pytest.raises(SystemExit, match=refusal):
        cli_main(["fit", "--config", str(CONFIGS / "resnet20_cifar.yaml"), "--data.root", str(runs / "data"), *TINY_RUN,
                  "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", str(last)])  # fmt: skip


@pytest.mark.slow
def test_a_test_on_part_of_its_images_says_so(runs, tmp_path):
    run = tmp_path / "resnet20_cifar-scale1of2" / "seed0"
    shutil.copytree(run_folders(runs)[0], run)
    cli_main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
              "--data.root", str(runs / "data"), "--trainer.limit_test_batches", "2",
              "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false"])  # fmt: skip
    newest = read_run_file(run)["tests"][-1]
    assert newest["test_subset"] == "full; limit_test_batches 2"
    paper(["record", str(run), "--ledger", str(tmp_path / "results")])
    assert "| all (limit_test_batches 2) |" in results_table(read_ledger(tmp_path / "results"))


@pytest.mark.slow
def test_a_scale_that_leaves_an_epoch_less_than_one_batch_is_one_line(runs, tmp_path):
    refusal = r"^error: Lightning cannot run this configuration: .*limit_train_batches.* choose a larger scale\)$"
    with pytest.raises(SystemExit, match=refusal):
        cli_main(["fit", "--config", str(CONFIGS / "resnet20_cifar.yaml"), "--data.root", str(runs / "data"), *TINY_RUN,
                  "--trainer.limit_train_batches", "1.0", "--schedule_scale", "0.05",
                  "--trainer.logger.init_args.save_dir", str(tmp_path)])  # fmt: skip


def test_the_paper_figure_stands_only_beside_runs_on_the_paper_data():
    from resnet_lab.paper.tables import paper_errors

    resnet20 = {"class": "CifarResNet", "depth": 20, "residual": True, "shortcut": "A", "num_classes": 10}
    assert paper_errors(resnet20, "cifar10") == (8.75, None)
    assert paper_errors(resnet20, "synthetic") is None
    resnet50 = {"class": "ImageNetResNet", "depth": 50, "residual": True, "shortcut": "B"}
    assert paper_errors({**resnet50, "num_classes": 1000}, "imagenet") == (22.85, 6.71)
    assert paper_errors({**resnet50, "num_classes": 10}, "imagenet") is None  # an ImageNet subset (imagenette)
