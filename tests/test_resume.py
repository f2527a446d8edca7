"""A run killed (SIGKILL) or stopped by a scheduler (SIGTERM, SIGUSR1) resumes with `--ckpt_path last` and ends with
exactly the weights and logged metrics of a run never interrupted (CPU, deterministic), on every loader: CIFAR's
device batches, CIFAR's DataLoader with workers, an ImageNet-layout folder with workers. Real processes, real
signals, real files."""

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONFIGS, REPO, subprocess_env, write_cifar_batch, write_tiny_imagenet
from resnet_lab.paper.ledger import RecordError, ledger_rows
from resnet_lab.paper.runs import Run
from resnet_lab.records import read_run_file

pytestmark = pytest.mark.slow  # processes killed and resumed

MAX_STEPS = 25  # 10 iterations per epoch: the interruptions fall inside epochs 1 and 2
# Presets stacked on the experiment, right after its config: the paper's recipe alone, and with the EMA of the
# weights, whose average, live weights and update count must all come back from last.ckpt. (The graph step's exact
# resume is tested in test_graph_step.py, in process.)
PRESETS = {"paper": (), "ema": ("--config", str(CONFIGS / "presets" / "ema.yaml"))}
# Each loader's experiment and its settings for a small run: 160 training images in batches of 16, 10 per epoch.
CIFAR = ("resnet20_cifar", "--data.val_size", "40", "--model.backbone.init_args.depth", "8")
WORKERS = ("--data.num_workers", "2")
IMAGENET = ("--data.crop_size", "32", "--data.val_resize", "36", "--data.test_scales", "[32]")
LOADERS = {
    "device": CIFAR,
    "dataloader": (*CIFAR, "--data.loader", "dataloader", *WORKERS),
    "imagenet": (
        "resnet18_imagenette",
        *IMAGENET,
        "--data.train_augmentation.init_args.scale_range",
        "[36,48]",
        *WORKERS,
    ),
}

# Slows each iteration down so that a signal lands mid-run, and reports progress on stdout. It holds no state that
# could change what is computed.
PACE = """
import time
import lightning as L

class Pace(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"iteration {trainer.global_step}", flush=True)
        time.sleep(0.25)
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    folder = root / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(folder / name, rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 40))
    write_tiny_imagenet(root / "data", train_per_class=40, val_per_class=3, classes=4)
    (root / "pace.py").write_text(PACE)
    return root


def command(workspace: Path, *extra: str, preset: str = "paper", loader: str = "device") -> list[str]:
    experiment, *settings = LOADERS[loader]
    root = workspace / "data" / ("imagenet" if loader == "imagenet" else "")
    return [
        sys.executable,
        str(REPO / "main.py"),
        "fit",
        "--config",
        str(CONFIGS / f"{experiment}.yaml"),
        *PRESETS[preset],
        "--data.root",
        str(root),
        "--data.batch_size",
        "16",
        *settings,
        "--trainer.max_steps",
        str(MAX_STEPS),
        "--trainer.deterministic",
        "true",
        "--trainer.log_every_n_steps",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.log_graph",
        "false",
        *extra,
    ]


def run(
    workspace: Path, folder: str, *extra: str, preset: str = "paper", loader: str = "device", **popen
) -> subprocess.Popen:
    cwd = workspace / folder
    cwd.mkdir(exist_ok=True)
    env = subprocess_env(workspace)
    return subprocess.Popen(
        command(workspace, *extra, preset=preset, loader=loader), cwd=cwd, env=env, text=True, **popen
    )


def finished(process: subprocess.Popen, timeout: float = 300) -> str:
    """The process's stderr, once it has ended well."""
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, (out or "") + (err or "")[-3000:]
    return err or ""


def run_dir(workspace: Path, folder: str, loader: str = "device") -> Path:
    return workspace / folder / "logs" / LOADERS[loader][0] / "version_0"


def scalars(events: Path) -> dict[tuple[str, int], float]:
    """Every logged value by (tag, step), except wall-clock ones (perf/*)."""
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload()
    return {
        (tag, e.step): e.value for tag in acc.Tags()["scalars"] if not tag.startswith("perf/") for e in acc.Scalars(tag)
    }


def assert_identical(a: object, b: object, where: str) -> None:
    """Equal, tensors bit for bit, through nested dicts and lists."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def ema_states(checkpoint: dict) -> dict:
    """The EMA callback's own saved state, by its state key; the checkpoint callbacks' states hold the run's
    folder, which differs between the runs compared."""
    return {key: state for key, state in checkpoint["callbacks"].items() if key.startswith("EMA")}


def assert_resumed_like(reference: Path, resumed: Path) -> None:
    """Same final weights, optimizer state and counters; every value the resumed process logged equals the value the
    uninterrupted run logged at that step. With the EMA, `state_dict` is the average: the live weights, the
    average's update count and the callback's state must match too."""
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for extra in ("current_model_state", "averaging_state"):  # written by the EMA callback, in both or neither
        assert (extra in a) == (extra in b), extra
        if extra in a:
            assert_identical(a[extra], b[extra], extra)
    assert_identical(ema_states(a), ema_states(b), "callbacks")
    for (_, x), (_, y) in zip(
        a["optimizer_states"][0]["state"].items(), b["optimizer_states"][0]["state"].items(), strict=True
    ):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    expected = scalars(next(reference.glob("events.out.tfevents.*")))
    newest = max(resumed.glob("events.out.tfevents.*"), key=os.path.getmtime)  # the resumed process's own file
    logged = scalars(newest)
    assert logged and max(step for _, step in logged) >= MAX_STEPS - 1
    for key, value in logged.items():
        assert key in expected, key
        assert value == expected[key], key  # bit-identical, not approximately equal


@pytest.fixture(scope="module")
def references(workspace: Path) -> Callable[[str, str], Path]:
    """The uninterrupted run of each preset and loader, run once for the module when a test first asks for it."""
    done: dict[tuple[str, str], Path] = {}

    def reference(preset: str, loader: str = "device") -> Path:
        if (preset, loader) not in done:
            folder = f"reference-{preset}-{loader}"
            pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            finished(run(workspace, folder, preset=preset, loader=loader, **pipes))
            done[preset, loader] = run_dir(workspace, folder, loader)
        return done[preset, loader]

    return reference


@pytest.fixture(scope="module")
def reference(references) -> Path:
    return references("paper")


def wait_for_iteration(process: subprocess.Popen, iteration: int) -> None:
    for line in process.stdout:
        if line.startswith("iteration ") and int(line.split()[1]) >= iteration:
            return
    pytest.fail(f"the run ended before iteration {iteration}: {process.stderr.read()[-3000:]}")


@pytest.mark.parametrize(
    ("preset", "loader"), [("paper", "device"), ("ema", "device"), ("paper", "dataloader"), ("paper", "imagenet")]
)
def test_a_run_killed_mid_epoch_resumes_bit_identically(workspace, references, preset, loader):
    reference = references(preset, loader)
    folder = f"killed-{preset}-{loader}"
    periodic = ["--periodic_checkpoint.every_n_train_steps", "3"]  # 25 iterations: the last write is a validation's
    pace = ["--trainer.callbacks+=pace.Pace", *periodic]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = run(workspace, folder, *pace, preset=preset, loader=loader, **pipes)
    wait_for_iteration(killed, 14)  # epoch 1, after the checkpoint of iteration 12
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    last = run_dir(workspace, folder, loader) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert 12 <= saved["global_step"] < MAX_STEPS and saved["global_step"] % 3 == 0
    # The batches training took in this epoch, not the ones the workers had fetched ahead.
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == saved["global_step"] % 10
    if preset == "ema":
        # The checkpoint the resume starts from holds a real average, of every iteration so far, and it is not the
        # live weights: a resume that took one for the other, or restarted the average, would end elsewhere.
        assert int(saved["averaging_state"]["n_averaged"]) == saved["global_step"]
        [ema] = ema_states(saved).values()
        assert ema["latest_update_step"] == saved["global_step"]
        live, average = saved["current_model_state"], saved["state_dict"]
        assert live.keys() == average.keys()
        assert not all(torch.equal(live[key], average[key]) for key in live if key.endswith(".weight"))
    else:
        assert "current_model_state" not in saved and not ema_states(saved)

    # Determinism: the same seed and config in another process logged the same values, bit for bit, until the kill.
    before_kill = scalars(next(run_dir(workspace, folder, loader).glob("events.out.tfevents.*")))
    expected = scalars(next(reference.glob("events.out.tfevents.*")))
    assert len(before_kill) > 10 and all(value == expected[key] for key, value in before_kill.items())

    resumed = run(workspace, folder, *pace, "--ckpt_path", "last", preset=preset, loader=loader, **pipes)
    assert "not resumable" not in finished(resumed)  # Lightning's warning about a loader it cannot resume
    assert_resumed_like(reference, run_dir(workspace, folder, loader))
    assert not (run_dir(workspace, folder, loader).parent / "version_1").exists()  # the same run goes on


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_scheduler_signal_saves_exits_cleanly_and_resumes_bit_identically(workspace, reference, signum):
    folder = signal.Signals(signum).name
    pace = ["--trainer.callbacks+=pace.Pace"]
    stopped = run(workspace, folder, *pace, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_iteration(stopped, 16)
    stopped.send_signal(signum)
    start = time.monotonic()
    out, err = stopped.communicate(timeout=60)
    assert stopped.returncode == 0, err[-3000:]
    assert time.monotonic() - start < 10  # no validation or anything long on the way out
    last = run_dir(workspace, folder) / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=False)["global_step"]
    assert 16 <= step < MAX_STEPS
    assert f"{folder}: saved {last.relative_to(workspace / folder)} after iteration {step}" in err

    # The results ledger refuses the stopped run, and takes it once resumed to its end: the same run, its wall time
    # summed over both sessions.
    stopped_record = read_run_file(run_dir(workspace, folder))
    assert stopped_record["finished"] is None and "iterations" not in stopped_record
    resume = re.escape("python main.py fit --config configs/resnet20_cifar.yaml --ckpt_path last")
    with pytest.raises(
        RecordError, match=rf"unfinished \(stopped before the end of {MAX_STEPS} iterations\): .*`{resume}`"
    ):
        ledger_rows(Run(run_dir(workspace, folder)))

    if signum == signal.SIGTERM:  # SIGUSR1 leaves the same checkpoint through the same code
        # A quick debug run of the experiment since, with a newer last.ckpt, is not what the command names.
        finished(run(workspace, folder, "--trainer.max_steps", "2", stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        resumed = run(workspace, folder, *pace, "--ckpt_path", "last", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err[-3000:]
        assert (
            f"resuming from {last.relative_to(workspace / folder)}: the only run of resnet20_cifar with this "
            "command's settings"
        ) in err
        assert_resumed_like(reference, run_dir(workspace, folder))
        # No training point is lost, also when the signal comes on an iteration that logs: the stopped process
        # logs its last iteration before it exits.
        speed = EventAccumulator(str(run_dir(workspace, folder)), size_guidance={"scalars": 0}).Reload()
        logged = {e.step for e in speed.Scalars("train/loss")}
        assert logged == {e.step for e in EventAccumulator(str(reference)).Reload().Scalars("train/loss")}
        # The clocks restart with the resumed process (Lightning starts no epoch when it resumes inside one).
        rates = [e.value for e in speed.Scalars("perf/images_per_s") if e.step >= step]
        # A clock left from before the resume would count the time since then: rates near 0. (Paced at 16 images every
        # 0.25 s, an idle machine logs about 60; a loaded one, a tenth of that.)
        assert rates and min(rates) > 1
        assert max(e.value for e in speed.Scalars("perf/epoch_time_s")) < 60
        resumed_record = read_run_file(run_dir(workspace, folder))
        assert resumed_record["run_id"] == stopped_record["run_id"]
        assert resumed_record["iterations"] == MAX_STEPS and resumed_record["finished"]
        assert resumed_record["wall_s"] > 16 * 0.25  # the first session's paced iterations are counted


def test_resuming_with_nothing_to_resume_says_so(workspace):
    process = run(workspace, "empty", "--ckpt_path", "last", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert err.strip().splitlines()[-1] == (
        "error: --ckpt_path last: no logs/resnet20_cifar/*/checkpoints/last.ckpt to resume from; start the "
        "run without --ckpt_path, or give a checkpoint's path"
    )
