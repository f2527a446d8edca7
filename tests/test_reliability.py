"""Bad checkpoints get one clear line naming the file and the problem (issue: reliability)."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, QUIET, REPO, RunsACommand, quiet_trainer, subprocess_env
from resnet_lab import CifarResNet, ImageClassifier
from resnet_lab.checkpoints import check_state_dict_matches, read_checkpoint
from resnet_lab.cli import main
from resnet_lab.errors import ConfigError, DataError


@pytest.fixture
def trained(cifar_root, tmp_path, monkeypatch):
    """A real checkpoint of a 2-iteration ResNet-20 run on the small on-disk CIFAR."""
    monkeypatch.chdir(tmp_path)
    data = ["--data.root", str(cifar_root), "--data.val_size", "50", "--data.batch_size", "16"]
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "resnet20_cifar.yaml"),
            *data,
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            *QUIET,
        ]
    )
    return tmp_path / "logs" / "resnet20_cifar" / "version_0" / "checkpoints" / "last.ckpt"


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(cifar_root, tmp_path, capsys):
    marker = tmp_path / "ran"
    doctored = tmp_path / "doctored.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6", "extra": RunsACommand(marker)}, doctored)
    with pytest.raises(DataError, match="doctored.ckpt is not a readable PyTorch checkpoint"):
        read_checkpoint(doctored)
    with pytest.raises(SystemExit, match="doctored.ckpt is not a readable PyTorch checkpoint"):
        main(["test", "--config", str(CONFIGS / "resnet20_cifar.yaml"), "--data.root", str(cifar_root),
              "--ckpt_path", str(doctored)])  # fmt: skip
    assert not marker.exists()


def test_checkpoint_of_another_architecture_or_class_count(trained):
    state = torch.load(trained, weights_only=True)["state_dict"]
    with pytest.raises(ConfigError, match=r"weights missing .*Use the config it was trained with"):
        check_state_dict_matches(ImageClassifier(CifarResNet(32)), state, "the checkpoint")
    with pytest.raises(ConfigError, match=r"another shape .*backbone.fc.weight \[10, 64\] vs \[100, 64\]"):
        check_state_dict_matches(ImageClassifier(CifarResNet(20, num_classes=100)), state, "the checkpoint")
    check_state_dict_matches(ImageClassifier(CifarResNet(20)), state, "the checkpoint")  # the right one fits


@pytest.mark.slow
def test_wrong_class_count_through_the_command_line(trained, cifar_root, tmp_path):
    # The data module links 100 classes into the net; the checkpoint has 10.
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    from conftest import write_cifar_batch

    for name, n in (("train", 60), ("test", 20)):
        write_cifar_batch(folder / name, torch.zeros(n, 3, 32, 32, dtype=torch.uint8).numpy(), [99] * n, b"fine_labels")
    args = [
        "test",
        "--config",
        str(CONFIGS / "resnet20_cifar.yaml"),
        "--ckpt_path",
        str(trained),
        "--data",
        "resnet_lab.data.CIFAR100DataModule",
        "--data.root",
        str(tmp_path / "cifar100"),
        "--data.val_size",
        "10",
        *QUIET,
    ]
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=180,
        env=subprocess_env(),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "does not fit this model" in result.stderr and "[10, 64] vs [100, 64]" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("graph_step", [False, True], ids=["ordinary", "graph_step"])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, graph_step):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from resnet_lab.callbacks import NonFiniteLossError, StopOnNonFiniteLoss

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.values.append(outputs["loss"].item())

    def explode_after_one_epoch(optimizer):  # lr x 1e12 from iteration 3: the weights overflow
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3], gamma=1e12)

    from resnet_lab.graph_step import GraphStepClassifier

    torch.manual_seed(0)
    model = (GraphStepClassifier if graph_step else ImageClassifier)(
        CifarResNet(8),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01, fused=True),
        lr_scheduler=explode_after_one_epoch,
    )
    data = DataLoader(TensorDataset(torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))), batch_size=4)
    losses, checkpoint = Losses(), ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callbacks = [losses, StopOnNonFiniteLoss(), checkpoint]
    trainer = quiet_trainer(
        tmp_path, max_epochs=20, log_every_n_steps=2, enable_checkpointing=True, callbacks=callbacks
    )
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(model, data, data)
    message = str(error.value)
    bad = [i for i, v in enumerate(losses.values) if not torch.isfinite(torch.tensor(v))]
    if bad:  # stopped by a loss, or earlier by the weights check before a validation
        assert f"not finite since iteration {bad[0]}" in message or "weights are not finite" in message
    assert "(learning rate 1e+10)" in message and "last.ckpt" in message
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)  # built in Python: hparams hold the module
    assert saved["global_step"] == 3  # the epoch before the explosion
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


WRITER = """
import sys, torch
from lightning.fabric.plugins.io import TorchCheckpointIO
io, path = TorchCheckpointIO(), sys.argv[1]
state = {"state_dict": {"w": torch.randn(8_000_000)}}  # 32 MB: a write takes a noticeable time
print("ready", flush=True)
for step in range(10**6):
    state["global_step"] = step
    io.save_checkpoint(state, path)  # how Lightning writes every checkpoint
"""


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_never_leaves_a_corrupt_file(tmp_path):
    import random
    import signal
    import time

    path = tmp_path / "last.ckpt"
    rng = random.Random(0)
    for _ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 1.0))  # somewhere inside a write, most likely
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        if path.exists():  # absent only if the very first write was cut short
            checkpoint = read_checkpoint(path)
            assert checkpoint["state_dict"]["w"].shape == (8_000_000,) and checkpoint["global_step"] >= 0
    assert path.exists()


def test_data_module_errors_are_one_line_too(imagenet_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Raised while the CLI links num_classes from the data module: jsonargparse wraps it; main() unwraps it.
    with pytest.raises(SystemExit, match=r"^error: .*nowhere/train does not exist: expected <root>/train"):
        main(["fit", "--config", str(CONFIGS / "resnet18_imagenette.yaml"), "--data.root", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"^error: scale_range .* must be increasing and start at >= crop_size 200"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "resnet18_imagenette.yaml"),
                "--data.root",
                str(imagenet_root),
                "--data.crop_size",
                "200",
                "--data.val_resize",
                "256",
            ]
        )


def test_paper_commands_refuse_to_overwrite_or_to_write_nothing(trained, tmp_path):
    from resnet_lab.paper.__main__ import main as paper

    (tmp_path / "logs" / "resnet56_cifar" / "seed1").mkdir(parents=True)
    (tmp_path / "logs" / "resnet56_cifar" / "seed1" / "config.yaml").write_text("")
    with pytest.raises(SystemExit, match=r"already holds seeds \[1\]"):
        paper(["seeds", str(CONFIGS / "resnet56_cifar.yaml"), "--seeds", "0", "1"])
    with pytest.raises(SystemExit, match="nothing to write"):
        paper(["export", str(trained)])


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--trainer.accelerator", "gpu", "No supported gpu backend found!"),
        ("--trainer.strategy", "deepspeed", "To use the `DeepSpeedStrategy`, you must have DeepSpeed installed."),
    ],
)
def test_an_accelerator_or_strategy_this_machine_lacks_is_one_line(
    tmp_path, monkeypatch, capsys, option, value, reason
):
    if value == "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if value == "deepspeed" and importlib.util.find_spec("deepspeed"):
        pytest.skip("DeepSpeed is installed")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "demo_synthetic.yaml"), option, value, *QUIET])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: the trainer cannot run as configured on this machine: {reason}")
    assert message.endswith("(without a GPU: --trainer.accelerator cpu)")


def test_sync_batchnorm_on_cpu_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ddp = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--config", str(CONFIGS / "demo_synthetic.yaml"), *ddp, "--trainer.sync_batchnorm", "true", *QUIET]
        )
    assert str(exit_info.value.code) == (
        "error: --trainer.sync_batchnorm true needs GPUs: PyTorch's SyncBatchNorm does not run on CPU. "
        "Turn it off (--trainer.sync_batchnorm false) to train data-parallel on CPU"
    )
