"""The reproduction commands (`python -m resnet_lab.paper ...`) on tiny real runs."""

import csv
import statistics
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from conftest import CONFIGS, TINY_RUN, quiet_trainer, write_tiny_cifar
from resnet_lab import CifarResNet, ImageClassifier, ImageNetResNet
from resnet_lab.errors import ConfigError, DataError, DatasetNotFoundError
from resnet_lab.models import Bottleneck, PreActBasicBlock, PreActBottleneck
from resnet_lab.paper.__main__ import main as paper
from resnet_lab.paper.responses import LayerResponseMonitor, layer_response_std, responses_of_3x3_layers
from resnet_lab.paper.runs import Run, find_runs
from resnet_lab.paper.tables import results_table
from resnet_lab.paper.weights import import_cifar_checkpoint, load_torchvision_weights


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory) -> Path:
    """plain-20 and ResNet-20, two seeds each, fit + test on a small on-disk CIFAR, as `seeds` runs them."""
    root = tmp_path_factory.mktemp("work")
    write_tiny_cifar(root / "data")
    cwd = Path.cwd()
    import os

    os.chdir(root)
    try:
        for config in ("plain20_cifar", "resnet20_cifar"):
            paper(
                [
                    "seeds",
                    str(CONFIGS / f"{config}.yaml"),
                    "--seeds",
                    "0",
                    "1",
                    "--data.root",
                    str(root / "data"),
                    *TINY_RUN,
                ]
            )
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.slow
def test_seeds_write_one_folder_per_seed_with_test_results(seeded_runs):
    runs = find_runs([seeded_runs / "logs" / "resnet20_cifar"])
    assert [r.name for r in runs] == ["resnet20_cifar/seed0", "resnet20_cifar/seed1"]
    assert all(r.last("test/err_top1") is not None for r in runs)
    assert runs[0].config["seed_everything"] == 0 and runs[1].config["seed_everything"] == 1
    # Different seeds, different weights.
    weights = [torch.load(r.path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for r in runs]
    assert not torch.equal(weights[0]["backbone.fc.weight"], weights[1]["backbone.fc.weight"])


def test_seeds_can_print_one_command_per_seed(capsys):
    paper(["seeds", "configs/resnet56_cifar.yaml", "--seeds", "3", "4", "--print-commands", "--data.root", "/d"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        len(lines) == 2 and "--seed_everything 4" in lines[1] and "--trainer.logger.init_args.version seed4" in lines[1]
    )
    assert lines[0].endswith("--data.root /d")


@pytest.mark.slow
def test_curves_csv_holds_exactly_the_logged_scalars(seeded_runs, tmp_path):
    out = tmp_path / "fig6"
    paper(
        [
            "curves",
            str(seeded_runs / "logs" / "plain20_cifar"),
            str(seeded_runs / "logs" / "resnet20_cifar"),
            "--out",
            str(out),
        ]
    )
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    for run in find_runs([seeded_runs / "logs" / "plain20_cifar", seeded_runs / "logs" / "resnet20_cifar"]):
        for curve, tag in (("train", "train/err_top1"), ("val", "val/err_top1")):
            logged = [(step, pytest.approx(value)) for step, value in run.scalars(tag)]
            written = [
                (int(r["step"]), float(r["error_pct"])) for r in rows if r["run"] == run.name and r["curve"] == curve
            ]
            assert written == logged and len(written) >= (6 if curve == "train" else 2)


@pytest.mark.slow
def test_table_reports_mean_std_best_and_the_paper(seeded_runs, tmp_path):
    out = tmp_path / "table6"
    paper(
        [
            "table",
            str(seeded_runs / "logs" / "resnet20_cifar"),
            str(seeded_runs / "logs" / "plain20_cifar"),
            "--out",
            str(out),
        ]
    )
    lines = out.with_suffix(".md").read_text().splitlines()
    errors = [r.last("test/err_top1") for r in find_runs([seeded_runs / "logs" / "resnet20_cifar"])]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["resnet20_cifar", "ResNet-20 (A)", "0.27M"]
    assert cells[3] == f"{statistics.mean(errors):.2f} ± {statistics.stdev(errors):.2f}"
    assert cells[4] == f"{min(errors):.2f}" and cells[6] == "2" and cells[7] == "8.75"
    plain = [c.strip() for c in lines[3].strip("|").split("|")]
    assert plain[1] == "plain-20" and plain[2] == "0.27M" and plain[7] == ""  # Table 6 lists no plain nets


def test_layer_response_std_equals_a_hand_computation():
    torch.manual_seed(0)
    net = CifarResNet(8).eval()
    net(torch.randn(8, 3, 32, 32))  # any weights; BN in eval mode uses its running statistics
    batches = [(torch.randn(5, 3, 32, 32), torch.zeros(5)) for _ in range(3)]
    names, std = layer_response_std(net, batches)
    assert names == [
        "bn1",
        "layer1.0.bn1",
        "layer1.0.bn2",
        "layer2.0.bn1",
        "layer2.0.bn2",
        "layer3.0.bn1",
        "layer3.0.bn2",
    ]
    outputs = {name: [] for name in names}
    hooks = [
        bn.register_forward_hook(
            lambda m, i, o, n=name: outputs[n].append(o.flatten().clone())
        )  # before the in-place ReLU
        for name, bn in responses_of_3x3_layers(net)
    ]
    with torch.no_grad():
        for images, _ in batches:
            net(images)
    for hook in hooks:
        hook.remove()
    expected = torch.stack([torch.cat(outputs[n]).double().std(unbiased=False) for n in names])
    torch.testing.assert_close(std, expected, rtol=1e-6, atol=1e-9)
    # Bottlenecks: only the BN after the 3x3 conv, never the 1x1s or the 7x7 stem.
    assert [n for n, _ in responses_of_3x3_layers(ImageNetResNet(50))][:2] == ["layer1.0.bn2", "layer1.1.bn2"]


@pytest.mark.parametrize(
    "block,depth,expected",
    [
        # The stem conv (no BN of its own) and each unit's 3x3 convs: what a pre-activation unit adds to its input.
        (PreActBasicBlock, 8, ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
                               "layer3.0.conv1", "layer3.0.conv2"]),
        (PreActBottleneck, 11, ["conv1", "layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"]),
        (Bottleneck, 11, ["bn1", "layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"]),
    ],
)  # fmt: skip
def test_fig7_measures_the_3x3_layers_each_unit_declares(block, depth, expected):
    net = CifarResNet(depth, shortcut="B", block=block)
    assert [n for n, _ in responses_of_3x3_layers(net)] == expected
    names, std = layer_response_std(net, [(torch.randn(4, 3, 32, 32), torch.zeros(4))])
    assert names == expected and (std > 0).all()


def test_fig7_refuses_a_network_that_declares_no_response_layers():
    with pytest.raises(ConfigError, match="ResNet does not declare which layers Fig. 7 measures"):
        responses_of_3x3_layers(torchvision.models.resnet18())


@pytest.mark.slow
def test_responses_command_on_run_checkpoints(seeded_runs, tmp_path, capsys):
    checkpoints = [
        seeded_runs / "logs" / c / "seed0" / "checkpoints" / "last.ckpt" for c in ("plain20_cifar", "resnet20_cifar")
    ]
    out = tmp_path / "fig7"
    paper(["responses", *map(str, checkpoints), "--out", str(out), "--data-root", str(seeded_runs / "data")])
    assert f"[2/2] measuring the layer responses of {checkpoints[1]}" in capsys.readouterr().out  # not silent
    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"plain-20 (plain20_cifar/seed0)", "ResNet-20 (resnet20_cifar/seed0)"}
    assert len(rows) == 2 * 19  # the stem and 2 per block: 19 3x3 layers in a 20-layer net
    assert out.with_suffix(".png").is_file()


def test_layer_response_monitor_logs_during_validation(tmp_path):
    model = ImageClassifier(CifarResNet(8), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    data = DataLoader(TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), batch_size=16)
    monitor = LayerResponseMonitor()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[monitor])
    trainer.fit(model, data, data)
    assert len(monitor.last_std) == 7 and trainer.callback_metrics["responses/mean_std"] > 0


def akamaster_checkpoint(net: CifarResNet, path: Path) -> None:
    """A checkpoint in the published format: `module.` prefix, `linear` classifier, `best_prec1`."""
    state = {f"module.{k.replace('fc.', 'linear.')}": v for k, v in net.state_dict().items()}
    torch.save({"best_prec1": 91.7, "state_dict": state}, path)


def test_import_cifar_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = CifarResNet(32).eval()
    akamaster_checkpoint(net, tmp_path / "resnet32.th")
    out = tmp_path / "imported.ckpt"
    paper(
        [
            "import-cifar",
            str(tmp_path / "resnet32.th"),
            "--config",
            str(CONFIGS / "resnet32_cifar.yaml"),
            "--out",
            str(out),
        ]
    )
    model = ImageClassifier.load_from_checkpoint(out).eval()
    assert model.backbone.depth == 32
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), net(x))
    (tmp_path / "broken.th").write_bytes((tmp_path / "resnet32.th").read_bytes()[:500])
    with pytest.raises(DataError, match="broken.th is not a readable PyTorch checkpoint"):
        import_cifar_checkpoint(tmp_path / "broken.th", CONFIGS / "resnet32_cifar.yaml", out)


def test_imported_resnet20_reproduces_its_published_accuracy(shared_data, tmp_path, monkeypatch):
    from resnet_lab.cli import main

    weights = sorted((shared_data / "pretrained" / "cifar10-akamaster").glob("resnet20-*.th"))
    if not weights:
        pytest.skip("the published CIFAR checkpoints are not in the shared data")
    monkeypatch.chdir(tmp_path)
    paper(["import-cifar", str(weights[0]), "--config", str(CONFIGS / "resnet20_cifar.yaml"), "--out", "r20.ckpt"])
    # Images 0..1016 of the shared test batch carry the official pixels; the weights expect ImageNet statistics.
    main(
        [
            "test",
            "--config",
            str(CONFIGS / "resnet20_cifar.yaml"),
            "--ckpt_path",
            "r20.ckpt",
            "--data.root",
            str(shared_data),
            "--data.normalization",
            "imagenet",
            "--data.test_range",
            "[0, 1017]",
            "--data.num_workers",
            "0",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    run = Run(tmp_path / "logs" / "resnet20_cifar" / "version_0")  # a test run: no checkpoints of its own
    assert run.last("test/acc_top1") >= 0.91


def test_export_to_torchvision_and_safetensors(tmp_path):
    net = ImageNetResNet(18, shortcut="B", stride_in_1x1=False)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "r18.ckpt")
    paper(
        [
            "export",
            str(tmp_path / "r18.ckpt"),
            "--torchvision",
            str(tmp_path / "r18.pth"),
            "--safetensors",
            str(tmp_path / "r18.safetensors"),
        ]
    )
    reference = torchvision.models.resnet18()
    reference.load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), strict=True)
    reference.load_state_dict(load_file(str(tmp_path / "r18.safetensors")), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(reference.eval()(x), net.eval()(x))
    # and back: torchvision's own state dict into ours
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    load_torchvision_weights(ImageNetResNet(18, shortcut="B"), tmp_path / "tv.pth")


@pytest.mark.slow
def test_runs_give_their_data_module(seeded_runs):
    run = Run(seeded_runs / "logs" / "resnet20_cifar" / "seed0")
    data = run.datamodule(root=str(seeded_runs / "data"))
    assert data.val_size == 50 and data.root == seeded_runs / "data"


def fake_run(folder: Path, depth: int, test_error: float) -> Path:
    """A finished run as the CLI leaves it: its saved config and its logged test error."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True)
    backbone = {"class_path": "resnet_lab.models.CifarResNet", "init_args": {"depth": depth, "shortcut": "A"}}
    data = {"class_path": "resnet_lab.data.CIFAR10DataModule", "init_args": {}}
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": backbone}, "data": data}))
    with SummaryWriter(str(folder)) as writer:
        writer.add_scalar("test/err_top1", test_error, 100)
    return folder


def test_table_never_merges_runs_of_one_experiment_with_different_networks(tmp_path):
    runs = [
        fake_run(tmp_path / "resnet20_cifar" / "seed0", 20, 9.0),
        fake_run(tmp_path / "resnet20_cifar" / "seed1", 20, 8.0),
        fake_run(tmp_path / "resnet20_cifar" / "quick", 8, 30.0),
    ]
    table = results_table(find_runs(runs))
    rows = {row.split("|")[1].strip(): row for row in table.splitlines()[2:]}
    assert set(rows) == {"resnet20_cifar (depth=20)", "resnet20_cifar (depth=8)"}
    assert "8.50 ± 0.71" in rows["resnet20_cifar (depth=20)"] and "30.00" in rows["resnet20_cifar (depth=8)"]


@pytest.mark.slow
def test_the_installed_package_needs_no_repository(seeded_runs, tmp_path):
    """`pip install .` (not editable), then the paper commands from another folder: nothing reads the checkout."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(REPO)], check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.manual_seed(0)
    akamaster_checkpoint(CifarResNet(20), elsewhere / "resnet20.th")
    logs = seeded_runs / "logs"
    for args in (
        ["import-cifar", "resnet20.th", "--out", "r20.ckpt"],
        ["table", str(logs / "resnet20_cifar"), str(logs / "plain20_cifar"), "--out", "table"],
        ["curves", str(logs / "resnet20_cifar"), "--out", "fig6"],
    ):
        result = subprocess.run(
            [sys.executable, "-c", "import resnet_lab, sys; print(resnet_lab.__file__, file=sys.stderr); "
             "from resnet_lab.paper.__main__ import main; main()", *args],
            cwd=elsewhere, env=subprocess_env(target), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert str(target) in result.stderr.splitlines()[0]  # the installed copy, not the checkout's src/
    assert ImageClassifier.load_from_checkpoint(elsewhere / "r20.ckpt").backbone.depth == 20
    assert "| resnet20_cifar | ResNet-20 (A) |" in (elsewhere / "table.md").read_text()
    assert (elsewhere / "fig6.png").is_file()


def test_an_evaluation_folder_is_not_taken_for_a_training_run(tmp_path):
    evaluation = fake_run(tmp_path / "resnet20_cifar" / "version_3", 20, 9.0)  # as main.py test used to leave it
    config = yaml.safe_load((evaluation / "config.yaml").read_text()) | {"ckpt_path": "elsewhere/last.ckpt"}
    (evaluation / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DatasetNotFoundError, match=r"version_3 is an evaluation of elsewhere/last.ckpt .*not a"):
        find_runs([evaluation])
    with pytest.raises(DatasetNotFoundError, match=r"no training run .* below .*resnet20_cifar \(only evaluations: v"):
        find_runs([evaluation.parent])


def test_figures_read_at_any_length():
    from resnet_lab.paper.curves import Curve, curves_figure
    from resnet_lab.paper.responses import responses_figure

    residual = {"class": "CifarResNet", "depth": 20, "residual": True}
    short = Curve("short", residual, [(0, 90.0), (399, 60.0)], [(399, 65.0)])  # one validation point
    fig, _ = curves_figure([short])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "iterations" and max(ax.get_xlim()) > 399
    one_point = [line for line in ax.get_lines() if len(line.get_xdata()) == 1]
    assert one_point and one_point[0].get_marker() == "o"  # drawn, not an empty line in the legend
    full = Curve("full", residual, [(0, 90.0), (64000, 0.5)], [(64000, 8.0)])
    assert curves_figure([full])[0].axes[0].get_xlabel() == "iter. (1e4)"  # the paper's unit

    fig, _ = responses_figure({"ResNet-8": torch.tensor([1.0, 0.5, 0.8, 0.2, 0.4, 0.3, 0.6])})
    fig.canvas.draw()
    top, bottom = fig.axes
    assert top.get_title().startswith("Std of the 3x3 layers' responses") and top.get_ylabel() == "response std"
    for ax in (top, bottom):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)  # layers are counted: no 2.5


def test_the_paper_figure_is_never_shown_beside_a_recipe_switch(tmp_path):
    paper_run = fake_run(tmp_path / "resnet20_cifar" / "seed0", 20, 8.5)
    switched = fake_run(tmp_path / "resnet20_cifar_cosine" / "seed0", 20, 7.9)
    config = yaml.safe_load((switched / "config.yaml").read_text()) | {"paper_recipe": False}  # as presets set it
    (switched / "config.yaml").write_text(yaml.safe_dump(config))
    rows = {
        row.split("|")[1].strip(): row.split("|")
        for row in results_table(find_runs([paper_run, switched])).splitlines()[2:]
    }
    assert rows["resnet20_cifar"][-3].strip() == "8.75"  # the paper's ResNet-20
    assert rows["resnet20_cifar_cosine"][-3].strip() == ""
