"""What TensorBoard shows of a run (resnet_lab.notebook), read back through TensorBoard itself."""

import csv
import json
import math
import pickle
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONFIGS, QUIET, REPO, RunsACommand, quiet_trainer, subprocess_env, transformed
from resnet_lab import CifarResNet, ImageClassifier
from resnet_lab.cli import main
from resnet_lab.data import CIFAR10DataModule, ImageNetDataModule, PaperAugmentation
from resnet_lab.data.cifar import read_class_names
from resnet_lab.notebook import MostConfidentWrong, TensorBoardNotebook, as_pictures
from resnet_lab.paper.__main__ import main as paper_main

RUN_IMAGES = {"samples/train", "samples/val", "samples/test", "test/confusion_matrix", "test/per_class_error",
              "test/confidently_wrong"}  # fmt: skip
TINY_DEMO = ["--config", str(CONFIGS / "demo_synthetic.yaml"), "--data.train_size", "128", "--data.val_size", "64",
             "--data.batch_size", "32", "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "2",
             "--test_after_fit", "true", *QUIET, "--notebook.enabled", "true"]  # fmt: skip


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs write under ./logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoardServer:
    """`tensorboard --logdir` as a process of its own on a free port, read through its HTTP data API."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                   "--port", str(self.port), "--load_fast", "false", "--reload_interval", "1"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def get(self, path: str, **query: str) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read()

    def json(self, path: str, **query: str):  # noqa: ANN201 - whatever the endpoint returns
        return json.loads(self.get(path, **query))

    def wait_for(self, path: str, ready, timeout: float = 90.0):  # noqa: ANN001, ANN201
        """The endpoint's JSON once `ready` holds of it (the server starts, then loads the events)."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read().decode()[-2000:]
            try:
                last = self.json(path)
                if ready(last):
                    return last
            except OSError:  # not listening yet
                pass
            time.sleep(0.5)
        pytest.fail(f"{path} never became ready: {last}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def chart_tags(layout: dict) -> dict[str, dict[str, list[str]]]:
    """category -> chart -> tags, of the custom-scalars plugin's merged layout."""
    return {
        category["title"]: {chart["title"]: chart["multiline"]["tag"] for chart in category["chart"]}
        for category in layout["category"]
    }


@pytest.mark.slow  # a TensorBoard server process
def test_tensorboard_serves_the_samples_layouts_and_test_analysis_of_real_runs(tmp_path):
    main(["fit", *TINY_DEMO])
    main(["fit", *TINY_DEMO, "--model.backbone.init_args.residual", "false"])
    paper_main(["curves", "logs/demo_synthetic", "--out", "figures/fig6"])
    residual, plain = "logs/demo_synthetic/version_0", "logs/demo_synthetic/version_1"
    server = TensorBoardServer(tmp_path)
    try:
        server.wait_for(
            "/data/plugin/images/tags", lambda t: all(set(t.get(run, {})) >= RUN_IMAGES for run in (residual, plain))
        )
        scalars = server.json("/data/plugin/scalars/tags")
        assert {"train/err_top1", "val/err_top1", "lr/log10", "lr-SGD"} <= set(scalars[residual])
        # lr/log10 is the learning rate's log, at the steps of the learning-rate monitor.
        log_lr = server.json("/data/plugin/scalars/scalars", run=residual, tag="lr/log10")
        lr = server.json("/data/plugin/scalars/scalars", run=residual, tag="lr-SGD")
        assert [p[1] for p in log_lr] == [p[1] for p in lr] == [1, 3]
        assert all(math.isclose(a[2], math.log10(b[2]), rel_tol=1e-6) for a, b in zip(log_lr, lr, strict=True))
        # Each grid is a real PNG image, served as TensorBoard shows it.
        for tag in RUN_IMAGES:
            (entry,) = server.json("/data/plugin/images/images", run=residual, tag=tag)
            png = server.get("/data/plugin/images/individualImage?" + entry["query"])
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, tag
        (train_grid,) = server.json("/data/plugin/images/images", run=residual, tag="samples/train")
        (test_grid,) = server.json("/data/plugin/images/images", run=residual, tag="samples/test")
        assert train_grid["step"] == 0 and test_grid["step"] == 4  # at the start of fit; at test, its weights' step

        layout = chart_tags(
            server.wait_for("/data/plugin/custom_scalars/layout", lambda t: len(t.get("category", [])) == 2)
        )
        assert layout["the paper's view of the run"] == {
            "top-1 error (%): training (augmented batches) and validation": ["^train/err_top1$", "^val/err_top1$"],
            "learning rate (log10)": ["^lr/log10$"],
            "loss: training and validation": ["^train/loss$", "^val/loss$"],
        }
        assert layout["Fig. 6: fig6"] == {"plain nets": ["^plain/"], "residual nets": ["^residual/"]}
        # paper curves: each run's curves under its panel's tags, the same points as its log.
        curve_runs = {run: tags for run, tags in scalars.items() if run.startswith("figures/tensorboard/fig6/")}
        assert sorted(sorted(tags) for tags in curve_runs.values()) == [
            ["plain/train_err", "plain/val_err"], ["residual/train_err", "residual/val_err"]
        ]  # fmt: skip
        (plain_curve,) = [run for run, tags in curve_runs.items() if "plain/val_err" in tags]
        logged = server.json("/data/plugin/scalars/scalars", run=plain, tag="val/err_top1")
        drawn = server.json("/data/plugin/scalars/scalars", run=plain_curve, tag="plain/val_err")
        assert [p[1] for p in drawn] == [p[1] for p in logged] == [3]
        assert [p[2] for p in drawn] == pytest.approx([p[2] for p in logged])
    finally:
        server.stop()
    assert server.process.returncode is not None


def test_the_per_class_table_adds_up_to_the_test_error_and_names_the_classes(cifar_root, tmp_path):
    names = [f"class-{i}" for i in range(10)]
    with (cifar_root / "cifar-10-batches-py" / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, f)
    data = [
        "--data.root",
        str(cifar_root),
        "--data.val_size",
        "50",
        "--data.batch_size",
        "16",
        "--data.num_workers",
        "0",
    ]
    notebook = [*QUIET, "--notebook.enabled", "true"]
    main(["fit", "--config", str(CONFIGS / "resnet20_cifar.yaml"), *data, "--trainer.max_steps", "3", *notebook])
    run = tmp_path / "logs" / "resnet20_cifar" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(last), *notebook])
    rows = list(csv.DictReader((run / "test_per_class.csv").open()))
    assert [r["name"] for r in rows] == names and [int(r["class"]) for r in rows] == list(range(10))
    images, errors = sum(int(r["images"]) for r in rows), sum(int(r["errors"]) for r in rows)
    assert images == 40  # the test batch
    (test,) = json.loads((run / "run.json").read_text())["tests"]
    assert 100.0 * errors / images == pytest.approx(test["metrics"]["test/err_top1"], abs=1e-3)
    for r in (r for r in rows if int(r["images"])):  # a class absent from the test has no error
        assert float(r["err_top1"]) == pytest.approx(100.0 * int(r["errors"]) / int(r["images"]), abs=0.01)
        assert int(r["times"]) <= int(r["errors"]) and (r["most_predicted_instead"] in names) == (int(r["times"]) > 0)


def test_notebook_enabled_false_logs_none_of_it(tmp_path):
    main(["fit", *TINY_DEMO, "--notebook.enabled", "false"])
    run = tmp_path / "logs" / "demo_synthetic" / "version_0"
    tags = {key: set() for key in ("images", "scalars", "tensors")}
    for events in run.glob("events.out.tfevents.*"):
        found = EventAccumulator(str(events)).Reload().Tags()
        for key in tags:
            tags[key] |= set(found[key])
    assert tags["images"] == set() and tags["tensors"] == set() and "lr/log10" not in tags["scalars"]
    assert "test/err_top1" in tags["scalars"] and not (run / "test_per_class.csv").exists()


def test_most_confident_wrong_keeps_the_highest_confidence_errors_of_every_batch():
    g = torch.Generator().manual_seed(0)
    kept = MostConfidentWrong(5)
    batches = [
        (torch.randn(n, 4, generator=g).mul(3).log_softmax(1), torch.randint(0, 4, (n,), generator=g))
        for n in (7, 3, 9)
    ]
    for i, (log_probs, labels) in enumerate(batches):
        kept.add(log_probs, labels, torch.full((len(labels), 1, 2, 2), float(i)))
    model = ImageClassifier(CifarResNet(8))
    model.trainer = quiet_trainer(Path("."))  # one process: nothing to gather
    confidence, predicted, label, images = kept.gathered(model)
    every = [
        (float(lp.max().exp()), int(lp.argmax()), int(y), i)
        for i, (lps, ys) in enumerate(batches)
        for lp, y in zip(lps, ys, strict=True)
    ]
    wrong = sorted((e for e in every if e[1] != e[2]), reverse=True)[:5]
    assert confidence.tolist() == pytest.approx([e[0] for e in wrong])
    assert predicted.tolist() == [e[1] for e in wrong] and label.tolist() == [e[2] for e in wrong]
    assert images[:, 0, 0, 0].tolist() == [e[3] for e in wrong]  # each error's own image
    # Fewer errors than places: only the errors.
    few = MostConfidentWrong(5)
    few.add(torch.tensor([[0.0, -9.0], [-9.0, 0.0], [0.0, -9.0]]), torch.tensor([0, 0, 0]), torch.zeros(3, 1, 1, 1))
    assert few.gathered(model)[2].tolist() == [0]


def test_the_pictures_are_the_images_the_loader_read(cifar_root):
    data = CIFAR10DataModule(root=str(cifar_root), batch_size=16, val_size=50, num_workers=0, download=False)
    data.setup("fit")
    for normalization in ("pixel_mean", "channel"):
        data.normalization = normalization
        data.setup("fit")
        raw, images, _ = transformed(data, data.val_dataloader())[0]
        assert not torch.allclose(images, raw.float() / 255)
        torch.testing.assert_close(as_pictures(images, data.normalize), raw.float() / 255, atol=1e-5, rtol=0)
    assert read_class_names(cifar_root / "cifar-10-batches-py" / "batches.meta", b"label_names", 10) is None


def test_a_doctored_label_list_runs_nothing(tmp_path):
    meta = tmp_path / "batches.meta"
    with meta.open("wb") as f:
        pickle.dump({b"label_names": RunsACommand(tmp_path / "ran")}, f)
    assert read_class_names(meta, b"label_names", 10) is None
    assert not (tmp_path / "ran").exists()
    with meta.open("wb") as f:  # a list of the wrong length: the class numbers rather than names for other classes
        pickle.dump({b"label_names": [b"cat"] * 9}, f)
    assert read_class_names(meta, b"label_names", 10) is None


def test_real_cifar_class_names(shared_data):
    names = read_class_names(shared_data / "cifar-10-batches-py" / "batches.meta", b"label_names", 10)
    assert names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("mode", ["ten_crop", "multi_scale"])
def test_every_view_of_a_test_is_shown_and_its_errors_analysed(imagenet_root, tmp_path, mode):
    L.seed_everything(0)
    small = dict(
        batch_size=4, crop_size=32, val_resize=36, num_workers=0, train_augmentation=PaperAugmentation((36, 48))
    )
    data = ImageNetDataModule(root=str(imagenet_root), eval_mode=mode, test_scales=(32, 40), **small)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    notebook = [TensorBoardNotebook(samples=8)]
    trainer = quiet_trainer(tmp_path, logger=logger, callbacks=notebook, max_steps=1, limit_val_batches=1)
    model = ImageClassifier(CifarResNet(8, num_classes=6))
    trainer.fit(model, datamodule=data)  # the loader's batches, decoded and cropped in its workers' way
    trainer.test(model, datamodule=data)
    tags = set()
    for events in Path(logger.log_dir).glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events), size_guidance={"images": 0}).Reload().Tags()["images"])
    assert tags == RUN_IMAGES
    rows = list(csv.DictReader((Path(logger.log_dir) / "test_per_class.csv").open()))
    assert rows[0]["name"] == "tench, Tinca tinca" and sum(int(r["images"]) for r in rows) == 12


@pytest.mark.slow  # data-parallel processes
def test_a_data_parallel_test_counts_every_image_once(cifar_root, tmp_path):
    data = ["--data.root", str(cifar_root), "--data.val_size", "50", "--data.batch_size", "16",
            "--data.num_workers", "0"]  # fmt: skip
    main(["fit", "--config", str(CONFIGS / "resnet20_cifar.yaml"), *data, "--trainer.max_steps", "2", *QUIET])
    run = tmp_path / "logs" / "resnet20_cifar" / "version_0"
    tables = {}
    for processes in (1, 2):
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if processes == 2 else []
        command = [sys.executable, *launch, str(REPO / "main.py"), "test", "--config", str(run / "config.yaml"),
                   "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.accelerator", "cpu",
                   "--trainer.devices", str(processes), *(["--trainer.strategy", "ddp"] if processes == 2 else []),
                   *QUIET, "--notebook.enabled", "true"]  # fmt: skip
        env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        tables[processes] = (run / "test_per_class.csv").read_text()
    # The two processes' counts, reduced, are the one process's: every test image once.
    assert tables[1] == tables[2]
    assert sum(int(r["images"]) for r in csv.DictReader(tables[2].splitlines())) == 40
    tags = set()
    for events in run.glob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events), size_guidance={"images": 0}).Reload().Tags()["images"])
    assert {"test/confusion_matrix", "test/confidently_wrong", "samples/test"} <= tags
