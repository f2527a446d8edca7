"""The command line's checks and hand-overs, as the plain functions they are."""

import os
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from conftest import CONFIGS
from resnet_lab.checkpoints import check_lightning_checkpoint
from resnet_lab.cli import main
from resnet_lab.errors import ConfigError, DataError, UserError
from resnet_lab.identity import run_to_resume
from resnet_lab.launch import check_writable, expand_recipes, link_num_classes, user_error


def lightning_file(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True)
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {}}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_resume_continues_the_run_the_command_names(tmp_path):
    experiment = tmp_path / "resnet20_cifar"
    settings = {"version_0": [], "version_1": [], "seed1": ["seed_everything 1 (this command: 0)"],
                "debug": ["trainer.max_steps 3 (this command: 64000)"]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"--ckpt_path last: no .*resnet20_cifar/\*/checkpoints/last.ckpt to resume"):
        run_to_resume(experiment, None, lambda run: settings[run.name])
    old = lightning_file(experiment / "version_0" / "checkpoints" / "last.ckpt", 1_000)
    new = lightning_file(experiment / "version_1" / "checkpoints" / "last.ckpt", 2_000)
    seed1 = lightning_file(experiment / "seed1" / "checkpoints" / "last.ckpt", 3_000)
    lightning_file(experiment / "debug" / "checkpoints" / "last.ckpt", 4_000)  # the newest, but another schedule
    lightning_file(tmp_path / "plain20_cifar" / "version_2" / "checkpoints" / "last.ckpt", 5_000)  # another one
    assert run_to_resume(experiment, None, lambda run: settings[run.name]) == (
        new,
        "the newest (by its last.ckpt) of 2 runs of resnet20_cifar with this command's settings",
    )
    os.utime(old, (6_000, 6_000))
    assert run_to_resume(experiment, None, lambda run: settings[run.name])[0] == old
    assert run_to_resume(experiment, "seed1", lambda run: settings[run.name]) == (
        seed1,
        "the run --trainer.logger.init_args.version seed1 names",
    )
    with pytest.raises(ConfigError, match=r"version seed2 names has no .*seed2/checkpoints/last.ckpt"):
        run_to_resume(experiment, "seed2", lambda run: settings[run.name])
    with pytest.raises(ConfigError, match=r"no run of .* has this command's settings \(debug has trainer.max_steps 3"):
        run_to_resume(experiment, None, lambda run: ["trainer.max_steps 3 (this command: 64000)"])


def test_checks_before_any_work(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "weights.pt")
    with pytest.raises(DataError, match="weights.pt is not a Lightning checkpoint; .* import-cifar"):
        check_lightning_checkpoint(tmp_path / "weights.pt")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="cannot write runs under .*a_file/logs .*--trainer.logger"):
        check_writable(tmp_path / "a_file" / "logs")
    check_writable(tmp_path / "logs")
    assert (tmp_path / "logs").is_dir()


def config_with(backbone: dict, data: dict) -> Namespace:
    return Namespace(model=Namespace(backbone=Namespace(backbone)), data=data)


@pytest.mark.parametrize(
    "data,classes",
    [("resnet_lab.data.CIFAR10DataModule", 10), ("resnet_lab.data.CIFAR100DataModule", 100)],
)
def test_the_network_gets_as_many_outputs_as_the_data_has_classes(data, classes):
    config = config_with(
        {"class_path": "torchvision.models.resnet18", "init_args": Namespace(num_classes=1000, weights=None)},
        {"class_path": data, "init_args": {"download": False}},
    )
    link_num_classes(config)
    assert config.model.backbone.init_args.num_classes == classes
    untouched = config_with({"class_path": "torch.nn.Flatten", "init_args": Namespace(start_dim=1)}, config.data)
    link_num_classes(untouched)
    assert "num_classes" not in untouched.model.backbone.init_args


def test_a_users_mistake_is_found_behind_the_errors_that_wrap_it():
    mistake = ConfigError("depth 21")
    try:
        try:
            raise mistake
        except ConfigError as err:
            raise ValueError("Problem with given class_path") from err
    except ValueError as wrapped:
        assert user_error(wrapped) is mistake
    assert user_error(RuntimeError("a bug")) is None
    assert issubclass(DataError, UserError)


def test_a_torchvision_factory_trains_as_the_backbone(cifar_root, tmp_path, monkeypatch):
    """README, "Bring your own backbone": torchvision's resnet18 (a factory function), fit and tested on CIFAR-10."""
    monkeypatch.chdir(tmp_path)
    common = [
        "--config", str(CONFIGS / "resnet20_cifar.yaml"), "--data.root", str(cifar_root), "--data.val_size", "50",
        "--model.backbone.class_path", "torchvision.models.resnet18",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    main(["fit", *common, "--data.batch_size", "16", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"])
    main(["test", *common, "--ckpt_path", "last", "--trainer.limit_test_batches", "1"])
    [last] = Path("logs").glob("resnet20_cifar/version_0/checkpoints/last.ckpt")
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state["backbone.fc.weight"].shape == (10, 512)  # torchvision's ResNet, given CIFAR-10's class count


def test_a_config_is_read_after_the_recipe_it_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "preset.yaml").write_text("trainer:\n  max_steps: 3\n")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.yaml").write_text("seed_everything: 1\n")
    (tmp_path / "recipes" / "family.yaml").write_text("recipe: base.yaml\n")
    (tmp_path / "exp.yaml").write_text("recipe: recipes/family.yaml\nexperiment: exp\n")
    args = ["fit", "--config", str(tmp_path / "exp.yaml"), "--config=preset.yaml", "--trainer.max_steps", "2"]
    assert expand_recipes(args) == [
        "fit",
        "--config", str(tmp_path / "recipes" / "base.yaml"),
        "--config", str(tmp_path / "recipes" / "family.yaml"),
        "--config", str(tmp_path / "exp.yaml"),
        "--config", "preset.yaml",
        "--trainer.max_steps", "2",
    ]  # fmt: skip
    # A preset given before its experiment still stacks on the experiment's recipe.
    assert expand_recipes(["fit", "--config", "preset.yaml", "--config", str(tmp_path / "exp.yaml")]) == [
        "fit",
        "--config", str(tmp_path / "recipes" / "base.yaml"),
        "--config", str(tmp_path / "recipes" / "family.yaml"),
        "--config", "preset.yaml",
        "--config", str(tmp_path / "exp.yaml"),
    ]  # fmt: skip
    (tmp_path / "recipes" / "base.yaml").write_text("recipe: family.yaml\n")
    with pytest.raises(ConfigError, match="name each other in a circle"):
        expand_recipes(["--config", str(tmp_path / "exp.yaml")])
    (tmp_path / "lost.yaml").write_text("recipe: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="lost.yaml names the recipe .*nowhere.yaml, which does not exist"):
        expand_recipes(["--config", str(tmp_path / "lost.yaml")])


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_each_experiment_is_a_few_lines_over_its_recipe(config):
    import yaml

    settings = [line for line in config.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    named = yaml.safe_load(config.read_text())
    assert named["experiment"] == config.stem
    if "recipe" in named:
        recipes = named["recipe"] if isinstance(named["recipe"], list) else [named["recipe"]]
        assert all((config.parent / r).is_file() for r in recipes) and len(settings) <= 22


def test_the_run_is_named_by_its_config_not_by_its_file_name(cifar_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "my_copy.yaml"
    copy.write_text((CONFIGS / "resnet20_cifar.yaml").read_text().replace("recipes/", f"{CONFIGS}/recipes/"))
    main(["fit", "--config", str(copy), "--data.root", str(cifar_root), "--data.val_size", "50",
          "--model.backbone.init_args.depth", "8", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.log_graph", "false"])  # fmt: skip
    [run] = Path("logs").glob("*/version_0")
    assert run.parent.name == "resnet20_cifar"
    saved = (run / "config.yaml").read_text()
    assert "recipe: null" in saved and "lr: 0.1" in saved  # the saved config holds the recipe's values itself


def test_the_experiment_config_is_the_one_that_names_the_experiment_even_after_a_preset():
    from resnet_lab.launch import experiment_config

    debug, experiment = str(CONFIGS / "presets" / "debug.yaml"), str(CONFIGS / "resnet20_cifar.yaml")
    assert experiment_config(["fit", "--config", debug, "--config", experiment]) == experiment
    assert experiment_config(["fit", f"--config={experiment}", "--config", debug]) == experiment
    assert experiment_config(["fit", "--config", debug]) == debug  # none names one: the first
    assert experiment_config(["fit", "--trainer.max_steps", "3"]) is None
