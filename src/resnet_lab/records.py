"""What a results ledger needs to know of a run that its config and logs do not say, kept in `<run>/run.json`:
the source commit, the device, the library versions, how the run differs from its experiment's config, its
schedule scale, its training wall time, and the test results of its weights (`python -m resnet_lab.paper record`)."""

import json
import os
import platform
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning
import torch
import torchvision
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from resnet_lab.checkpoints import read_checkpoint
from resnet_lab.errors import ConfigError
from resnet_lab.files import atomic_write_text

RUN_FILE = "run.json"
# The final values TensorBoard's HPARAMS tab shows beside each run's settings.
HPARAM_METRICS = ("train/loss", "val/err_top1", "val/err_top5", "test/err_top1", "test/err_top5")


def source_commit() -> str:
    """The git commit of this package's source, `+dirty` if tracked files differ from it (results/ aside, which
    the ledger itself changes); `unknown` outside a git checkout."""
    source = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)results")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (empty where /proc/cpuinfo is not there to read)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, flags


def cpu_has_bf16() -> bool | None:
    """Whether the CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX); None where its flags cannot be read.
    Without, torch emulates bf16 on the CPU, many times slower than fp32 (benchmarks/train_speed.py measures it)."""
    _, flags = cpu_info()
    return bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None


def device_name(trainer: Trainer) -> str:
    """The accelerator the run trained on, e.g. `NVIDIA H200` or `cpu: AMD EPYC 7B13 (AVX2), 2 threads`: on a CPU
    with the vector instructions torch uses, and `bf16` where it has bfloat16 instructions (speeds differ 3x)."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        model, _ = cpu_info()
        features = torch.backends.cpu.get_cpu_capability() + (", bf16" if cpu_has_bf16() else "")
        name = f"cpu: {model} ({features}), {torch.get_num_threads()} threads"
    else:
        name = device.type
    return f"{trainer.world_size} x {name}" if trainer.world_size > 1 else name


RUN_ID = re.compile(r"[0-9a-f]{12}")  # uuid4().hex[:12], as RunRecord makes them


def check_run_id(run_id: object, source: object) -> None:
    """A run id read from elsewhere becomes part of file names under results/: refused in one line unless it is one."""
    if run_id is not None and not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
        raise ConfigError(f"{source}: run_id {run_id!r} is not a run id (12 hex digits, {RUN_ID.pattern})")


def read_run_file(run: Path) -> dict:
    path = run / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    check_run_id(record.get("run_id"), path)
    return record


def _write_run_file(run: Path, record: dict) -> None:
    atomic_write_text(run / RUN_FILE, json.dumps(record, indent=1) + "\n")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunRecord(Callback):
    """Keep `<run>/run.json` up to date: what the run is (at fit start), how far it got and how long it took (at fit
    end), and every test of its weights (`main.py test --ckpt_path <run>/checkpoints/...`, or `--test_after_fit`).

    The command line adds it to every run that has a logger; `python -m resnet_lab.paper record` reads the file.
    Its state travels in checkpoints, so a resumed run keeps its identity and sums its wall time, and a run is
    refused if resumed with another protocol than it was started with.

    Args:
        experiment: the experiment's name (its config's `experiment:`).
        overrides: `key=value` for every setting in which the run differs from its experiment's config.
        protocol: the options that set how much of the experiment the run trains (the command line gives the
            schedule's scale), kept in run.json and refused in another value when the run is resumed.
        settings: what TensorBoard's HPARAMS tab shows of the run's settings (the command line gives its whole
            config: the model's, the data's and the trainer's); None: the model's and the data module's
            hyperparameters.
    """

    def __init__(
        self,
        experiment: str | None = None,
        overrides: list[str] | None = None,
        protocol: dict[str, float] | None = None,
        settings: dict[str, Any] | None = None,
    ):
        self.experiment = experiment
        self.overrides = overrides
        self.protocol = protocol or {}
        self.settings = settings
        self.run_id: str | None = None
        self.started: str | None = None
        self.wall_s_before = 0.0  # training wall time of the sessions before a resume
        self.session_start: float | None = None
        self.resumed_protocol: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "started": self.started,
            "wall_s": self._wall_s(),
            "protocol": self.protocol,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_run_id(state_dict.get("run_id"), "the checkpoint's RunRecord state")
        self.run_id, self.started = state_dict.get("run_id"), state_dict.get("started")
        self.wall_s_before = float(state_dict.get("wall_s", 0.0))
        # Checkpoints written before the protocol had a key of its own kept it beside the others.
        legacy = {k: v for k, v in state_dict.items() if k not in ("run_id", "started", "wall_s")}
        self.resumed_protocol = state_dict.get("protocol", legacy)

    def _wall_s(self) -> float:
        session = 0.0 if self.session_start is None else time.perf_counter() - self.session_start
        return self.wall_s_before + session

    @staticmethod
    def _folder(trainer: Trainer) -> Path | None:
        """The run's folder; a collective under data parallelism, so every process must ask."""
        return Path(trainer.log_dir) if trainer.loggers and trainer.log_dir else None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for key, value in self.protocol.items():
            trained = self.resumed_protocol.get(key, value)
            if trained != value:
                raise ConfigError(
                    f"this checkpoint was trained with --{key} {trained} and is resumed with {value}: resume it with "
                    f"--{key} {trained}"
                )
        self.session_start = time.perf_counter()
        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        self.started = self.started or _now()
        folder = self._folder(trainer)
        if folder is None or not trainer.is_global_zero:
            return
        record = read_run_file(folder)
        if record.get("run_id") not in (None, self.run_id):
            record = {}  # another run's file: a new run in a reused folder starts its own record
        record |= {
            "run_id": self.run_id,
            "experiment": self.experiment,
            "overrides": self.overrides,
            **self.protocol,
            "planned_iterations": trainer.max_steps,
            "started": self.started,
            "commit": source_commit(),
            "device": device_name(trainer),
            "precision": str(trainer.precision),
            "versions": {
                "torch": torch.__version__,
                "lightning": lightning.__version__,
                "torchvision": torchvision.__version__,
            },
            "finished": None,
        }
        record.setdefault("tests", [])
        _write_run_file(folder, record)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = self._folder(trainer)
        if folder is not None and trainer.is_global_zero:
            record = read_run_file(folder) | {
                "iterations": trainer.global_step,
                "wall_s": round(self._wall_s(), 1),
                "finished": _now(),
            }
            _write_run_file(folder, record)
            self._log_hparams(trainer, pl_module)
        # The other processes wait for the first one's files: one that exits while the first still writes can abort
        # at exit in the process group's teardown (seen with gloo on CPU).
        trainer.strategy.barrier("run_record")

    def _log_hparams(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The run's settings and final errors for TensorBoard's HPARAMS tab. Lightning writes that summary only
        when it is given metrics, and logs them at step 0: they go under `hparams/`, so that no curve gains a
        point."""
        metrics = {
            f"hparams/{key.replace('/', '_')}": float(value)
            for key, value in trainer.callback_metrics.items()
            if key in HPARAM_METRICS
        }
        data = getattr(trainer.datamodule, "hparams", None)
        settings = self.settings
        if settings is None:
            settings = {**pl_module.hparams, **({"data": dict(data)} if data else {})}
        params = {
            "experiment": self.experiment,
            **self.protocol,
            "seed": os.environ.get("PL_GLOBAL_SEED"),
            **settings,
        }
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and metrics:
                logger.log_hyperparams(params, metrics)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = self._folder(trainer)  # on every process: `trainer.log_dir` is a broadcast
        if trainer.is_global_zero:
            self._record_test(trainer, pl_module, log_dir)
        trainer.strategy.barrier("run_record")  # as at the end of fit

    def _record_test(self, trainer: Trainer, pl_module: LightningModule, log_dir: Path | None) -> None:
        if trainer.ckpt_path:  # the weights of a checkpoint: their test goes into the run that trained them
            checkpoint = Path(trainer.ckpt_path)
            folder = checkpoint.parent.parent
            step = read_checkpoint(checkpoint).get("global_step")
            weights = checkpoint.name
        else:  # --test_after_fit: the weights just trained
            folder, step, weights = log_dir, trainer.global_step, "final"
        if folder is None or not (folder / RUN_FILE).is_file():
            return  # weights from elsewhere (an imported checkpoint): no run to add the test to
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        data = trainer.datamodule
        test_range = getattr(data, "test_range", None)
        subset = "full" if test_range is None else f"test_range {list(test_range)}"
        if trainer.limit_test_batches != 1.0:  # a part of that subset only: say so, or it reads as all of it
            subset += f"; limit_test_batches {trainer.limit_test_batches:g}"
        record = read_run_file(folder)
        record["tests"] = [
            *record.get("tests", []),
            {
                "weights": weights,
                "step": step,
                "test_subset": subset,
                "date": _now(),
                "commit": source_commit(),
                "metrics": metrics,
            },
        ]
        _write_run_file(folder, record)
        self._log_hparams(trainer, pl_module)
