import re
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging, ProgressBar, TQDMProgressBar

from conftest import CONFIGS, QUIET, TINY_RUN, data_class, transformed
from resnet_lab import ImageClassifier
from resnet_lab.callbacks import ThrottledProgressBar, WarmupUntilTrainError
from resnet_lab.cli import ResNetLabCLI, main

EXPERIMENTS = sorted(p for p in CONFIGS.glob("*.yaml"))
PRESETS = sorted((CONFIGS / "presets").glob("*.yaml"))


def cifar_args(cifar_root: Path, *extra: str) -> list[str]:
    """The ResNet-20 experiment on the small on-disk CIFAR of `cifar_root`, quiet, plus `extra`."""
    data = ["--data.root", str(cifar_root), "--data.val_size", "50", "--data.batch_size", "16"]
    return ["--config", str(CONFIGS / "resnet20_cifar.yaml"), *data, "--data.num_workers", "0", *QUIET, *extra]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs write under ./logs


def data_args(config: Path, cifar_root: Path, imagenet_root: Path) -> list[str]:
    data = data_class(config)
    if data.endswith("CIFAR10DataModule"):
        return ["--data.root", str(cifar_root), "--data.val_size", "50", "--data.num_workers", "0"]
    if data.endswith("ImageNetDataModule"):
        return ["--data.root", str(imagenet_root), "--data.num_workers", "0"]
    return []


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_config_parses_and_instantiates(config, cifar_root, imagenet_root):
    cli = ResNetLabCLI(args=["--config", str(config), *data_args(config, cifar_root, imagenet_root)], run=False)
    init = yaml.safe_load(config.read_text())["model"]["backbone"]["init_args"]
    backbone = cli.model.backbone
    assert backbone.depth == init["depth"] and backbone.residual == init.get("residual", True)
    assert backbone.num_classes == cli.datamodule.num_classes  # linked from the data module
    optimizer = cli.model.optimizer(cli.model.parameters())
    assert isinstance(optimizer, torch.optim.SGD)
    if "cifar" in config.stem:
        assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["weight_decay"] == 1e-4
        assert cli.datamodule.batch_size == 128 and cli.trainer.max_steps == 64000
        scheduler = cli.model.lr_scheduler(optimizer)
        if not cli.config.paper_recipe:  # a modern recipe over the paper's: its switches, and said so
            assert type(scheduler).__name__ == "WarmupCosineLR" and cli.model.label_smoothing == 0.1
            assert [type(a).__name__ for a in cli.datamodule.augmentations] == ["PadCropFlip", "EachImage"]
            assert any(isinstance(c, EMAWeightAveraging) for c in cli.trainer.callbacks)
            return
        assert scheduler.milestones == [32000, 48000] or list(scheduler.milestones) == [32000, 48000]
        assert cli.model.scheduler_interval == "step"
        warmup = getattr(scheduler, "warmup_steps", 0)
        # The deep nets warm up: until the error is below 80% (None; the paper) or for 400 iterations (the sequel).
        assert warmup == 0 if backbone.depth < 110 else warmup in (None, 400)
        switches = [c for c in cli.trainer.callbacks if isinstance(c, WarmupUntilTrainError)]
        assert len(switches) == (1 if warmup is None else 0)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_stack_on_an_experiment(preset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "resnet110_cifar.yaml"), "--config", str(preset), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)

    def assert_within(given: dict, printed: dict) -> None:
        for key, value in given.items():
            if key not in printed and key.rstrip("+") not in printed and "init_args" in printed:
                printed = printed["init_args"]  # a class's arguments, given without its class_path
            if key.endswith("+"):  # appended to the experiment's list: the list ends with it
                tail = printed[key[:-1]][-len(value) :]
                for item, shown in zip(value, tail, strict=True):
                    assert_within(item, shown)
            elif isinstance(value, dict):
                assert_within(value, printed[key])
            else:
                assert printed[key] == value, key

    assert_within(yaml.safe_load(preset.read_text()), printed)
    assert printed["model"]["init_args"]["backbone"]["init_args"]["depth"] == 110


def test_command_line_overrides_switch_architecture_and_precision(cifar_root):
    cli = ResNetLabCLI(
        args=[
            "--config",
            str(CONFIGS / "resnet20_cifar.yaml"),
            "--data.root",
            str(cifar_root),
            "--model.backbone.init_args.depth",
            "56",
            "--model.backbone.init_args.shortcut",
            "B",
            "--model.backbone.init_args.residual",
            "false",
            "--trainer.precision",
            "bf16-mixed",
        ],
        run=False,
    )
    backbone = cli.model.backbone
    assert (backbone.depth, backbone.shortcut, backbone.residual) == (56, "B", False)
    assert len(backbone.layer1) == 9 and cli.trainer.precision == "bf16-mixed"
    assert cli.datamodule.root == cifar_root


def test_fit_writes_one_run_folder_and_the_checkpoint_rebuilds_the_model(cifar_root, tmp_path):
    steps = ["--trainer.max_steps", "6", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"]
    main(["fit", *cifar_args(cifar_root, *steps, "--trainer.log_every_n_steps", "1")])
    run = tmp_path / "logs" / "resnet20_cifar" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    assert last.is_file() and list((run / "checkpoints").glob("best-step*.ckpt"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "resnet_lab.ImageClassifier"  # the module class is a choice, recorded
    assert saved["model"]["init_args"]["backbone"]["init_args"]["depth"] == 20 and saved["trainer"]["max_steps"] == 6

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    assert {"train/loss", "train/err_top1", "val/err_top1", "val/err_top5", "lr-SGD"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3, 4, 5]

    model = ImageClassifier.load_from_checkpoint(last)
    assert model.backbone.depth == 20 and model.backbone.shortcut == "A"
    state = torch.load(last, weights_only=True)["state_dict"]
    torch.testing.assert_close(model.state_dict()["backbone.fc.weight"], state["backbone.fc.weight"])

    for subcommand in ("validate", "test", "predict"):
        limits = ["--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"]
        main(
            [
                subcommand,
                "--config",
                str(run / "config.yaml"),
                "--ckpt_path",
                str(last),
                *QUIET,
                *limits,
                "--trainer.limit_predict_batches",
                "1",
            ]
        )
    # An evaluation of the run's checkpoint logs into the run: no folder of its own, the run's config.yaml kept.
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert yaml.safe_load((run / "config.yaml").read_text()) == saved
    assert (run / "config-test.yaml").is_file() and (run / "config-validate.yaml").is_file()
    events = EventAccumulator(str(run)).Reload()
    assert events.Scalars("test/err_top1") and [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3, 4, 5]
    # TensorBoard's HPARAMS tab: the run's settings with its final errors, under hparams/ (logged at step 0).
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/session_start_info", "_hparams_/experiment"} <= set(hparams)
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    shown = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info.hparams
    # The data's and the trainer's settings beside the model's.
    assert {"model/class", "model/backbone/init_args/depth", "data/init_args/batch_size", "trainer/max_steps"} <= set(
        shown
    )
    assert shown["model/backbone/init_args/depth"].number_value == 20 and "seed" in shown
    assert {"hparams/val_err_top1", "hparams/test_err_top1"} <= set(events.Tags()["scalars"])


def test_an_iteration_validation_interval_counts_across_epochs(cifar_root, tmp_path):
    # Every 5 iterations over 3-iteration epochs, as `val_check_interval: 2000` is over CIFAR's 351-iteration ones.
    steps = ["--trainer.max_steps", "11", "--trainer.limit_train_batches", "3", "--trainer.val_check_interval", "5"]
    main(["fit", *cifar_args(cifar_root, *steps, "--trainer.limit_val_batches", "1")])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "resnet20_cifar" / "version_0")).Reload()
    assert [e.step for e in events.Scalars("val/err_top1")] == [4, 9, 10]  # after iterations 5, 10 and the last


def test_a_run_saved_with_the_validation_rule_written_out_is_still_the_run_last_resumes(cifar_root, tmp_path):
    steps = ["--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.val_check_interval", "5",
             "--trainer.limit_val_batches", "1"]  # fmt: skip
    main(["fit", *cifar_args(cifar_root, *steps)])
    run = tmp_path / "logs" / "resnet20_cifar" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["check_val_every_n_epoch"] == 1
    saved["trainer"]["check_val_every_n_epoch"] = None  # as the command line wrote it before the Trainer did
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    resumed = ResNetLabCLI(args=["fit", *cifar_args(cifar_root, *steps), "--ckpt_path", "last"])
    assert resumed.trainer.ckpt_path == str(Path("logs/resnet20_cifar/version_0/checkpoints/last.ckpt"))
    assert resumed.trainer.check_val_every_n_epoch is None


def test_a_config_given_as_a_dict_with_a_key_no_option_takes_is_one_line():
    # Fit's own arguments in a module-only parser (run=False), as a saved config.yaml read as a dict holds them.
    with pytest.raises(SystemExit) as refusal:
        ResNetLabCLI(args={"ckpt_path": None, "model": {"backbone": {"class_path": "CifarResNet"}}}, run=False)
    assert str(refusal.value.code).startswith("error: ckpt_path is not an option here (")


def test_a_batch_limit_of_1_is_one_batch(cifar_root, tmp_path):
    # Lightning types the limits `float | int`, so its parser alone would read 1 as 1.0: all of the batches.
    for given, expected in (("1", 1), ("1.0", 1.0), ("2", 2)):
        cli = ResNetLabCLI(args=cifar_args(cifar_root, "--trainer.limit_val_batches", given), run=False)
        assert cli.trainer.limit_val_batches == expected and type(cli.trainer.limit_val_batches) is type(expected)
    quick = tmp_path / "quick.yaml"  # as a config file writes them
    quick.write_text("trainer:\n  limit_val_batches: 1\n  limit_test_batches: 1.0\n  limit_train_batches: 3\n")
    trainer = ResNetLabCLI(args=cifar_args(cifar_root, "--config", str(quick)), run=False).trainer
    assert (trainer.limit_val_batches, trainer.limit_test_batches, trainer.limit_train_batches) == (1, 1.0, 3)
    assert (type(trainer.limit_val_batches), type(trainer.limit_test_batches)) == (int, float)


def test_a_run_ending_mid_epoch_validates_its_final_model(cifar_root, tmp_path):
    # 5 iterations of 3-batch epochs: the last one ends mid-epoch, as the paper's 64k iterations do.
    steps = ["--trainer.max_steps", "5", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]
    main(["fit", *cifar_args(cifar_root, *steps, "--checkpoint.save_top_k", "-1")])
    checkpoints = tmp_path / "logs" / "resnet20_cifar" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("best-*")) == ["best-step3.ckpt", "best-step5.ckpt"]


def test_demo_config_fits_and_its_loss_falls(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    small = ["--data.train_size", "512", "--data.val_size", "128", "--trainer.max_epochs", "2"]
    main(["fit", "--config", str(CONFIGS / "demo_synthetic.yaml"), *small, "--trainer.log_every_n_steps", "1", *QUIET])
    run = tmp_path / "logs" / "demo_synthetic" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    events = EventAccumulator(str(run)).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert [e.step for e in events.Scalars("val/err_top1")] == [7, 15]


def test_replacing_the_callbacks_of_a_warmup_experiment_is_refused(cifar_root):
    args = cifar_args(cifar_root, "--trainer.max_steps", "2", "--trainer.callbacks", "LearningRateMonitor")
    args[args.index(str(CONFIGS / "resnet20_cifar.yaml"))] = str(CONFIGS / "resnet110_cifar.yaml")
    with pytest.raises(SystemExit, match=r"error: .*no callback ends the warm-up.*--trainer.callbacks\+="):
        main(["fit", *args])


@pytest.mark.slow
def test_paper_recipe_learns_real_cifar10(shared_data, tmp_path):
    steps = ["--trainer.max_steps", "80", "--trainer.limit_val_batches", "10"]
    main(["fit", "--config", str(CONFIGS / "resnet20_cifar.yaml"), "--data.root", str(shared_data), *steps, *QUIET])
    last = tmp_path / "logs" / "resnet20_cifar" / "version_0" / "checkpoints" / "last.ckpt"
    metrics = torch.load(last, weights_only=False)["callbacks"]
    best = next(v for k, v in metrics.items() if k.startswith("ModelCheckpoint"))["best_model_score"]
    assert best < 80.0  # validation top-1 error after 80 iterations; chance is 90%


def test_the_progress_bar_is_throttled_unless_the_user_chose_one(cifar_root):
    def bars(*extra: str) -> list[ProgressBar]:
        base = ["--config", str(CONFIGS / "resnet20_cifar.yaml"), "--data.root", str(cifar_root), *extra]
        return [c for c in ResNetLabCLI(args=base, run=False).trainer.callbacks if isinstance(c, ProgressBar)]

    assert [type(b) for b in bars()] == [ThrottledProgressBar]
    assert bars("--trainer.enable_progress_bar", "false") == []
    chosen = bars("--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate", "7")
    assert [(type(b), b.refresh_rate) for b in chosen] == [(TQDMProgressBar, 7)]


def _first_training_batch(cifar_root: Path, seed: int) -> torch.Tensor:
    cli = ResNetLabCLI(args=[*cifar_args(cifar_root), "--seed_everything", str(seed)], run=False)
    cli.datamodule.trainer = cli.trainer
    cli.datamodule.setup("fit")
    [(_, images, _)] = transformed(cli.datamodule, [next(iter(cli.datamodule.train_dataloader()))])
    return images


def test_seeds_differ_in_training_order_and_augmentation_but_not_in_the_split(cifar_root):
    seed1, again, seed2 = (_first_training_batch(cifar_root, s) for s in (1, 1, 2))
    assert torch.equal(seed1, again)
    assert not torch.equal(seed1, seed2)
    splits = []
    for seed in (1, 2):
        cli = ResNetLabCLI(args=[*cifar_args(cifar_root), "--seed_everything", str(seed)], run=False)
        cli.datamodule.setup("fit")
        splits.append(cli.datamodule.val_set.labels)
    assert torch.equal(*splits)


def test_help_shows_the_project(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "log into that run, where `table` finds it" in " ".join(top.split())
    assert "Lightning Trainer command line tool" not in top
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    fit = capsys.readouterr().out
    assert len(fit.splitlines()) < 1000  # not every nn.Module of torch and torchmetrics
    assert "the run this command names" in " ".join(fit.split())  # our `--ckpt_path last`, not Lightning's
    assert "subclass of ImageClassifier" in " ".join(fit.split())  # the module's class is a choice
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "ImageClassifier"])  # its arguments
    module = capsys.readouterr().out
    backbone = module[module.index("  --model.backbone BACKBONE\n") :][:800]
    assert "this project's" in backbone and "CifarResNet, ImageNetResNet" in " ".join(backbone.split())
    with pytest.raises(SystemExit):
        main(["fit", "--data.help", "CIFAR10DataModule"])  # short names work
    assert "--data.root ROOT" in capsys.readouterr().out


def test_the_progress_bar_after_a_resume_mid_epoch(cifar_root, tmp_path, capfd):
    base = ["--config", str(CONFIGS / "resnet20_cifar.yaml"), "--data.root", str(cifar_root), "--data.val_size", "50",
            "--data.batch_size", "16", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.log_graph", "false", "--trainer.limit_train_batches", "5",
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"]  # fmt: skip
    main(["fit", *base, "--trainer.max_steps", "2"])  # stops inside epoch 0, after 2 of its 5 iterations
    capfd.readouterr()
    last = tmp_path / "logs" / "resnet20_cifar" / "version_0" / "checkpoints" / "last.ckpt"
    main(["fit", *base, "--trainer.max_steps", "4", "--ckpt_path", str(last)])
    bar = capfd.readouterr().out.replace("\r", "\n")
    # The epoch and its length (Lightning starts no epoch on such a resume), where it resumed, the training window's
    # loss and error (a percentage, which the bar says), and the run's whole name.
    assert re.search(r"Epoch 0:  50%.* 2/4 ", bar), bar  # resumed after 2 of the 4 iterations this epoch trains
    assert re.search(r"Epoch 0: 100%.* 4/4 .*train/loss=[\d.]+, train/err_top1=\d+\.\d\d%.*run=version_1", bar), bar
    assert re.search(r"val/err_top1=\d+\.\d\d%", bar), bar
    assert not re.search(r"Epoch 0: .*/\?", bar)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_a_true_precision_trains_and_tests_on_the_device_batches(cifar_root, tmp_path, monkeypatch, precision):
    """The device-resident batches are made after Lightning converts a batch to the precision's input type: they
    are converted here, as is the example input the network graph is traced with."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "resnet20_cifar.yaml"), "--data.root", str(cifar_root), *TINY_RUN,
          "--model.backbone.init_args.depth", "8", "--trainer.precision", precision, "--test_after_fit", "true",
          "--trainer.logger.init_args.log_graph", "true"])  # fmt: skip
    last = torch.load(
        tmp_path / "logs" / "resnet20_cifar" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False
    )
    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16}[precision]
    assert last["global_step"] == 6 and last["state_dict"]["backbone.fc.weight"].dtype == dtype


FORK = '''
from resnet_lab import ImageClassifier


class Penalised(ImageClassifier):
    """A fork's module: the training loss plus a penalty on the logits' size, one new argument."""

    def __init__(self, *args, penalty: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.penalty = penalty

    def loss_and_means(self, images, labels):
        logits = self(images)
        loss = self.loss(logits, labels) + self.penalty * logits.square().mean()
        return loss, self.train_means.add(logits, labels, loss)
'''


def test_a_forks_module_is_one_class_and_one_option(cifar_root, tmp_path, monkeypatch, capsys):
    (tmp_path / "fork.py").write_text(FORK)
    monkeypatch.syspath_prepend(str(tmp_path))
    steps = ["--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    main(["fit", *cifar_args(cifar_root, *steps), "--model", "fork.Penalised", "--model.penalty", "0.5"])
    run = tmp_path / "logs" / "resnet20_cifar" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["class_path"] == "fork.Penalised" and saved["init_args"]["penalty"] == 0.5
    assert saved["init_args"]["backbone"]["init_args"]["depth"] == 20  # the experiment's own settings kept
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["_class_path"] == "fork.Penalised" and hparams["penalty"] == 0.5
    # The stock command tests the fork's run when the command names the fork's class (its own code)...
    evaluate = ["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.limit_test_batches", "1"]
    cli = ResNetLabCLI(args=["test", *cifar_args(cifar_root), "--model", "fork.Penalised", *evaluate])
    assert type(cli.model).__name__ == "Penalised" and cli.model.penalty == 0.5
    assert "test/err_top1" in cli.trainer.callback_metrics
    # ... and a checkpoint that names a class the command does not is data: refused in one line.
    capsys.readouterr()
    with pytest.raises(SystemExit, match="fork.Penalised"):
        main(["test", *cifar_args(cifar_root), *evaluate])
    with pytest.raises(SystemExit) as refusal:  # so is the run `last` would resume
        main(["fit", *cifar_args(cifar_root, *steps), "--ckpt_path", "last"])
    assert "version_0 has model fork.Penalised, which this command does not name (--model fork.Penalised does)" in str(
        refusal.value.code
    )
    resumed = ResNetLabCLI(args=["fit", *cifar_args(cifar_root, *steps), "--model", "fork.Penalised",
                                 "--model.penalty", "0.5", "--ckpt_path", "last"])  # fmt: skip
    assert resumed.trainer.ckpt_path == str(Path("logs/resnet20_cifar/version_0/checkpoints/last.ckpt"))
