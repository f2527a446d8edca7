"""A new user's mistakes on the command line, each one clear line (issue 13): this table drives the test and the
"Mistakes on the command line" section of docs/reliability.md (`python tests/test_mistakes.py` rewrites it).

Every command runs as the real command line does, `main.py` with its argv in a process of its own (see
run_commands.py: forked from one process that imported the CLI once, since 40 Python starts would cost minutes),
and must exit non-zero with one line (a second for a hint) that names the option or file, without a traceback.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import QUIET, REPO, subprocess_env, write_tiny_cifar

DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- mistakes: tests/test_mistakes.py -->", "<!-- /mistakes -->"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Mistake:
    """`command` is main.py's arguments (or `-m resnet_lab.paper ...`) with {placeholders} for the files the test
    makes; the output must hold `says` (which names `option`)."""

    what: str
    command: str
    says: str
    gpu_free: bool = False  # only where this machine has no GPU

    def argv(self, files: dict[str, str]) -> list[str]:
        return shlex.split(expand(self.command).format(**files))


TINY = ["--data.val_size", "20", "--data.batch_size", "8", "--data.num_workers", "0", *QUIET]
R20 = "--config configs/resnet20_cifar.yaml --data.root {cifar}"
R18 = "--config configs/resnet18_imagenette.yaml"
GRAPH = "--config configs/presets/gpu_graph.yaml"


def expand(text: str) -> str:
    """The commands' shorthands for the two experiments most mistakes start from, and for the graph step's preset."""
    return text.replace("{r20}", R20).replace("{r18}", R18).replace("{graph}", GRAPH)


MISTAKES = [
    Mistake("a typo in a network's argument", "fit {r20} --model.backbone.init_args.dept 56",
            "model.backbone.init_args.dept: resnet_lab.models.CifarResNet has no argument 'dept' (did you mean depth?"),
    Mistake("the same typo in a config file", "fit --config {typo_config} --data.root {cifar}",
            "model.backbone.init_args.depht: resnet_lab.models.CifarResNet has no argument 'depht' (did you mean"),
    Mistake("a shortcut option the paper does not have", "fit {r20} --model.backbone.init_args.shortcut D",
            "--model.backbone.init_args.shortcut D: expected one of 'A', 'B', 'C'"),
    Mistake("a misspelt choice", "fit {r20} --data.init_args.normalization imagnet",
            "--data.init_args.normalization imagnet: expected one of 'pixel_mean', 'channel', 'imagenet'"),
    Mistake("a precision Lightning does not know", "fit {r20} --trainer.precision bf17",
            "--trainer.precision bf17: expected one o"),
    Mistake("a depth as text", "fit {r20} --model.backbone.init_args.depth twenty",
            "--model.backbone.init_args.depth twenty: expected a whole number"),
    Mistake("a learning rate that is not a number", "fit {r20} --model.optimizer.init_args.lr fast",
            "--model.optimizer.init_args.lr fast: expected a number"),
    Mistake("a batch size that is not a number", "fit {r20} --data.batch_size x",
            "--data.init_args.batch_size x: expected a whole number"),
    Mistake("no --config at all", "fit", "no experiment given (missing --model.backbone)"),
    Mistake("a class given without the argument it needs", "fit {r20} --data.init_args.augmentations+=EachImage",
            "--data.init_args.augmentations.transform must be given"),
    Mistake("a config file that does not exist", "fit --config configs/resnet21_cifar.yaml",
            "--config configs/resnet21_cifar.yaml: no such file"),
    Mistake("a YAML syntax error", "fit --config {broken_config}",
            "broken.yaml is not valid YAML at line 3, column 1"),
    Mistake("an unknown --trainer option", "fit {r20} --trainer.max_epoch 3",
            "unknown option --trainer.max_epoch (did you mean --trainer.max_epochs?"),
    Mistake("an abbreviated option (argparse would take it as --trainer.max_steps)", "fit {r20} --trainer.max_step 3",
            "unknown option --trainer.max_step (did you mean --trainer.max_steps?; options are never abbreviated)"),
    Mistake("a network class that does not exist", "fit {r20} --model.backbone resnet_lab.ResNet21",
            "--model.backbone: resnet_lab.ResNet21 does not exist (did you mean resnet_lab.CifarResNet?)"),
    Mistake("an unknown subcommand", "fti {r20}", "invalid choice: 'fti' (choose from 'fit', 'validate'"),
    Mistake("a CIFAR depth that is not 6n+2", "fit {r20} --model.backbone.init_args.depth 21",
            "depth with BasicBlock must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202...), got 21"),
    Mistake("an ImageNet depth not in Table 1", "fit {r18} --data.root {imagenet} --model.backbone.init_args.depth 19",
            "depth must be one of 18, 34, 50, 101, 152"),
    Mistake("--schedule_scale above 1", "fit {r20} --schedule_scale 2", "--schedule_scale must be in (0, 1]"),
    Mistake("--trainer.max_steps 0", "fit {r20} --trainer.max_steps 0", "--trainer.max_steps 0 trains nothing"),
    Mistake("a negative learning rate", "fit {r20} --model.optimizer.init_args.lr -0.1 --trainer.max_steps 1",
            "Invalid learning rate: -0.1"),
    Mistake("a batch size of 0", "fit {r20} --data.batch_size 0", "batch_size must be at least 1, got 0"),
    Mistake("a batch size of -1", "fit {r20} --data.batch_size -1", "batch_size must be at least 1, got -1"),
    Mistake("a batch that does not split over the processes",
            "fit {r20} --trainer.accelerator cpu --trainer.strategy ddp --trainer.devices 2 --data.batch_size 127",
            "batch_size 127 is the global batch and must split evenly over the 2 processes"),
    Mistake("graph step with another optimizer than SGD", "fit {r20} {graph} --model.optimizer torch.optim.Adam",
            "the graph step (GraphStepClassifier): the update is torch.optim.SGD's fused kernel"),
    Mistake("graph step with SGD unfused", "fit {r20} {graph} --model.optimizer.init_args.fused false",
            "set --model.optimizer.init_args.fused true"),
    Mistake("graph step with gradient accumulation", "fit {r20} {graph} --trainer.accumulate_grad_batches 2",
            "the graph step (GraphStepClassifier): each replay is one whole update: set "
            "--trainer.accumulate_grad_batches 1"),
    Mistake("graph step with gradient clipping", "fit {r20} {graph} --config configs/presets/grad_clip.yaml",
            "the graph step (GraphStepClassifier): gradient clipping is not in the captured step"),
    Mistake("graph step over several processes",
            "fit {r20} {graph} --trainer.accelerator cpu --trainer.strategy ddp --trainer.devices 2",
            "the graph step (GraphStepClassifier): it replays one process's step, and this run has 2 processes"),
    Mistake("graph step with a schedule stepped per epoch", "fit {r20} {graph} --model.scheduler_interval epoch",
            "this schedule is stepped per epoch: give it in iterations, its milestones (or other lengths) converted"),
    Mistake("graph step with a schedule on a metric",
            "fit {r20} {graph} --model.lr_scheduler torch.optim.lr_scheduler.ReduceLROnPlateau",
            "the graph step (GraphStepClassifier): ReduceLROnPlateau follows a validation metric"),
    Mistake("graph step inside compile's own CUDA graphs",
            "fit {r20} {graph} --model.compile true --model.compile_mode reduce-overhead",
            "compile_mode reduce-overhead records CUDA graphs of its own"),
    Mistake("graph step inside max-autotune's CUDA graphs",
            "fit {r20} {graph} --model.compile true --model.compile_mode max-autotune",
            "compile_mode max-autotune records CUDA graphs of its own"),
    Mistake("graph step with activation checkpointing",
            "fit {r20} {graph} --model.backbone.init_args.activation_checkpointing true",
            "the graph step (GraphStepClassifier): activation checkpointing saves and restores the CUDA random state"),
    Mistake("graph step over a run without an end", "fit {r20} {graph} --trainer.max_steps -1 --trainer.max_epochs -1",
            "the step tables the learning rate of the whole run, which has no end: set --trainer.max_steps"),
    Mistake("graph step with stochastic weight averaging",
            "fit {r20} {graph} --trainer.callbacks+=StochasticWeightAveraging --trainer.callbacks.swa_lrs 0.05 "
            "--trainer.callbacks.device null",
            "the graph step (GraphStepClassifier): StochasticWeightAveraging swaps in a schedule of its own"),
    Mistake("graph step inside a compile backend's CUDA graphs",
            "fit {r20} {graph} --model.compile true --model.compile_backend cudagraphs",
            "compile_backend cudagraphs records CUDA graphs of its own"),
    Mistake("graph step with a schedule that cycles the momentum",
            "fit {r20} {graph} --model.lr_scheduler torch.optim.lr_scheduler.OneCycleLR "
            "--model.lr_scheduler.init_args.max_lr 0.1 --model.lr_scheduler.init_args.total_steps 100",
            "the graph step (GraphStepClassifier): OneCycleLR also changes momentum during the run"),
    Mistake("fused and foreach SGD together", "fit {r20} {graph} --model.optimizer.init_args.foreach true",
            "the optimizer cannot be built: `fused` and `foreach` cannot be `True` together"),
    Mistake("more CPU processes than cores", "fit {r20} --trainer.accelerator cpu --trainer.devices {too_many}",
            "--trainer.devices {too_many} starts {too_many} training processes on the CPU"),
    Mistake("negative loader workers, DataLoader path", "fit {r20} --data.num_workers -1 --data.loader dataloader",
            "--data.num_workers must be 0 (load in the training process) or more, got -1"),
    Mistake("negative loader workers, device path", "fit {r20} --data.num_workers -1",
            "--data.num_workers must be 0 (load in the training process) or more, got -1"),
    Mistake("a validation split larger than the training set", "fit {r20} --data.val_size 60000",
            "val_size must be in [0, 200), got 60000"),
    Mistake("a test range beyond the test set", "test {r20} --data.test_range [0,20000] --ckpt_path {checkpoint}",
            "test_range [0, 20000] must be [start, stop) with 0 <= start < stop <= 40"),
    Mistake("a test range that ends before it starts",
            "test {r20} --data.test_range [30,10] --ckpt_path {checkpoint}",
            "test_range [30, 10] must be [start, stop) with 0 <= start < stop <= 40"),
    Mistake("no GPU for --trainer.accelerator gpu", "fit {r20} --trainer.accelerator gpu",
            "the trainer cannot run as configured on this machine: No supported gpu backend found!", gpu_free=True),
    Mistake("a data root that does not exist, download of", "fit {r20}/nowhere --data.download false",
            "no CIFAR10 found: looked for"),
    Mistake("a data root that does not exist, download on, no network", "fit {r20}/nowhere",
            "and downloading it failed"),
    Mistake("the cifar-10-batches-py folder itself as the root", "fit {r20}/cifar-10-batches-py",
            "cifar-10-batches-py folder itself: give the folder that holds it"),
    Mistake("a CIFAR folder without its batch files", "fit --config configs/resnet20_cifar.yaml --data.root {hollow}",
            "data_batch_1 is missing: the CIFAR folder must hold data_batch_1"),
    Mistake("a data root that is a file", "fit --config configs/resnet20_cifar.yaml --data.root {a_file}",
            "--data.root {a_file} is a file: give the folder that holds cifar-10-batches-py/"),
    Mistake("an ImageNet config on the CIFAR root", "fit {r18} --data.root {cifar}",
            "train does not exist: expected <root>/train"),
    Mistake("an ImageNet root without val/", "fit {r18} --data.root {imagenet_no_val}",
            "val does not exist: expected <root>/train"),
    Mistake("a corrupt JPEG in a train folder",
            "fit {r18} --data.root {imagenet_corrupt} --data.num_workers 1 --data.batch_size 8 --trainer.max_steps 3",
            "cannot decode image"),
    Mistake("a log folder that cannot be written", "fit {r20} --trainer.logger.init_args.save_dir {a_file}/logs",
            "cannot write runs under"),
    Mistake("a checkpoint that does not exist", "test {r20} --ckpt_path missing.ckpt",
            "missing.ckpt does not exist"),
    Mistake("an empty checkpoint file", "test {r20} --ckpt_path {empty_checkpoint}",
            "empty.ckpt is not a readable PyTorch checkpoint (EOFError: an empty file)"),
    Mistake("a truncated checkpoint", "test {r20} --ckpt_path {truncated_checkpoint}",
            "truncated.ckpt is not a readable PyTorch checkpoint (RuntimeError: PytorchStreamReader failed"),
    Mistake("a text file as checkpoint", "test {r20} --ckpt_path {text_checkpoint}",
            "notes.ckpt is not a readable PyTorch checkpoint (UnpicklingError: not written by torch.save"),
    Mistake("published weights as --ckpt_path", "test {r20} --ckpt_path {published_weights}",
            "is not a Lightning checkpoint; for published CIFAR weights run `python -m resnet_lab.paper import-cifar`"),
    Mistake("a ResNet-20 checkpoint tested under the ResNet-56 config",
            "test --config configs/resnet56_cifar.yaml --data.root {cifar} --ckpt_path {checkpoint}",
            "holds another network than the config names (depth 20 in the checkpoint, 56 in the config)"),
    Mistake("--ckpt_path last with nothing to resume", "fit --config configs/resnet32_cifar.yaml --ckpt_path last",
            "--ckpt_path last: no"),
    Mistake("a run's checkpoints folder as --ckpt_path", "test {r20} --ckpt_path {checkpoint_folder}",
            "checkpoints is a folder: give a checkpoint file in it: best-step2.ckpt, last.ckpt"),
    Mistake("a test without weights", "test {r20}", "test needs trained weights: --ckpt_path"),
    Mistake("--schedule_scale 0", "fit {r20} --schedule_scale 0", "--schedule_scale must be in (0, 1]"),
    Mistake("--trainer.val_check_interval 0", "fit {r20} --trainer.val_check_interval 0",
            "--trainer.val_check_interval 0: give a number of iterations"),
    Mistake("--config before the subcommand", "--config configs/resnet20_cifar.yaml fit",
            "--config configs/resnet20_cifar.yaml comes before the subcommand: put it after"),
    Mistake("a folder as --config", "fit --config configs", "--config configs is a folder: give one of its"),
    Mistake("a checkpoint as --config", "fit --config {checkpoint}", "last.ckpt is not a text file"),
    Mistake("an empty config file", "fit {r20} --config {empty_config}", "empty.yaml is empty"),
    Mistake("a misspelt option in a config file", "fit {r20} --config {unknown_key_config}",
            "trainer.max_stepz (in a --config file) is not an option of fit (did you mean trainer.max_steps?)"),
    Mistake("a number where a config wants a list", "fit {r20} --config {milestones_config}",
            "--model.lr_scheduler.init_args.milestones 32000: expected a list"),
    Mistake("a residual unit that does not exist", "fit {r20} --model.backbone.init_args.block Nope",
            "--model.backbone.init_args.block Nope: no class of that name is known here"),
    Mistake("a misspelt augmentation class",
            """fit {r20} --data.augmentations '[{{"class_path": "resnet_lab.data.PadCropFlop"}}]'""",
            "resnet_lab.data.PadCropFlop does not exist (did you mean resnet_lab.data.PadCropFlip?)"),
    Mistake("a module given as the network", "fit {r20} --model.backbone.class_path torchvision.models",
            "--model.backbone torchvision.models: not a class of the kind this option takes"),
    Mistake("an option with a dash for its underscore", "fit {r20} --ckpt-path last",
            "unknown option --ckpt-path (did you mean --ckpt_path?"),
    Mistake("an ImageNet folder as a CIFAR config's root",
            "fit --config configs/resnet20_cifar.yaml --data.root {imagenet}",
            "holds an ImageFolder dataset (train/, val/), not cifar-10-batches-py/"),
    Mistake("a misspelt paper command", "-m resnet_lab.paper tabel logs", "argument command: invalid choice: 'tabel'"),
    Mistake("a paper table of a folder that does not exist", "-m resnet_lab.paper table nowhere",
            "nowhere does not exist: give run folders"),
]  # fmt: skip


def make_files(root: Path) -> dict[str, str]:
    """The files the mistakes name, made under `root`; `root`/logs holds a real 2-iteration ResNet-20 run."""
    write_tiny_cifar(root / "cifar")
    (root / "configs").symlink_to(REPO / "configs")
    (root / "hollow" / "cifar-10-batches-py").mkdir(parents=True)
    (root / "a_file").write_text("")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "notes.ckpt").write_text("not a checkpoint")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(16, 3, 3, 3)}}, root / "published.th")
    config = (REPO / "configs" / "resnet20_cifar.yaml").read_text().replace("depth:", "depht:")
    (root / "typo.yaml").write_text(config.replace("recipe: recipes/", f"recipe: {REPO}/configs/recipes/"))
    (root / "broken.yaml").write_text("model:\n  backbone: [\n")
    (root / "empty.yaml").write_text("")
    (root / "max_stepz.yaml").write_text("trainer:\n  max_stepz: 3\n")
    (root / "milestones.yaml").write_text("model:\n  lr_scheduler:\n    init_args:\n      milestones: 32000\n")
    from torchvision.io import write_jpeg

    g = torch.Generator().manual_seed(0)
    for tree, splits in (("imagenet", ("train", "val")), ("no_val", ("train",)), ("corrupt", ("train", "val"))):
        for split in splits:
            for wnid in ("n01440764", "n02102040", "n02979186"):
                folder = root / tree / split / wnid
                folder.mkdir(parents=True)
                for i in range(3):
                    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=g)
                    write_jpeg(image, str(folder / f"{i}.JPEG"))
                if tree == "corrupt" and split == "train":
                    (folder / "bad.JPEG").write_bytes(b"\xff\xd8 not a JPEG")
    files = {
        "cifar": root / "cifar", "hollow": root / "hollow", "a_file": root / "a_file",
        "empty_checkpoint": root / "empty.ckpt", "text_checkpoint": root / "notes.ckpt",
        "published_weights": root / "published.th", "typo_config": root / "typo.yaml",
        "broken_config": root / "broken.yaml", "imagenet": root / "imagenet", "imagenet_no_val": root / "no_val",
        "imagenet_corrupt": root / "corrupt", "too_many": CORES + 1,
        "checkpoint": root / "logs" / "resnet20_cifar" / "version_0" / "checkpoints" / "last.ckpt",
        "truncated_checkpoint": root / "truncated.ckpt", "empty_config": root / "empty.yaml",
        "unknown_key_config": root / "max_stepz.yaml", "milestones_config": root / "milestones.yaml",
        "checkpoint_folder": root / "logs" / "resnet20_cifar" / "version_0" / "checkpoints",
    }  # fmt: skip
    return {key: str(value) for key, value in files.items()}


def run_commands(stages: list[list[dict]]) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "run_commands.py")],
        input=json.dumps({"stages": stages}),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Every mistake's exit code and output (stdout, then stderr), by its `what`."""
    root = tmp_path_factory.mktemp("mistakes")
    files = make_files(root)
    no_network = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # refused at once
    env = {"RESNET_LAB_DATA": str(root / "cifar"), "PYTHONPATH": str(REPO / "src"), **no_network}
    trained = ["main.py", "fit", *shlex.split(R20.format(**files)), *TINY, "--trainer.max_steps", "2",
               "--trainer.limit_val_batches", "1"]  # fmt: skip
    setup = [{"argv": trained, "cwd": str(root), "env": env, "out": str(root / "setup")}]
    commands = []
    for i, mistake in enumerate(MISTAKES):
        cwd = root / f"case{i}"
        cwd.mkdir()
        (cwd / "configs").symlink_to(REPO / "configs")
        argv = mistake.argv(files)
        if argv[:2] != ["-m", "resnet_lab.paper"]:
            # Small enough for the tiny data, right after the first config, so that what the mistake sets wins.
            if "--config" in argv:
                at = argv.index("--config") + 2
                tiny = TINY if "cifar" in argv[at - 1] else TINY[2:]  # ImageNet's split is its folders
                argv = [*argv[:at], *tiny, *argv[at:]]
            argv = ["main.py", *argv]
        commands.append({"argv": argv, "cwd": str(cwd), "env": env, "out": str(root / f"case{i}.log")})
    (setup_result,) = run_commands([setup])
    assert setup_result["returncode"] == 0, Path(setup[0]["out"] + ".stderr").read_text()[-3000:]
    checkpoint = Path(files["checkpoint"]).read_bytes()
    Path(files["truncated_checkpoint"]).write_bytes(checkpoint[: len(checkpoint) // 2])
    results = {r["out"]: r["returncode"] for r in run_commands([commands])}
    outcomes = {}
    for mistake, command in zip(MISTAKES, commands, strict=True):
        text = Path(command["out"] + ".stdout").read_text() + Path(command["out"] + ".stderr").read_text()
        outcomes[mistake.what] = (results[command["out"]], text, mistake.says.format(**files))
    return outcomes


# What Lightning prints as it starts, before a mistake found while the trainer or the data is set up.
STARTUP = re.compile(
    r"^(\[rank: \d+\] )?(Seed set to \d+|GPU available: .*|TPU available: .*|Using .* Automatic Mixed Precision.*)$"
)


@pytest.mark.slow
@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: m.what)
def test_a_mistake_is_one_clear_line(mistake, outcomes):
    if mistake.gpu_free and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    returncode, text, says = outcomes[mistake.what]
    lines = [line for line in text.splitlines() if line.strip() and not STARTUP.match(line)]
    assert returncode != 0, text
    assert "Traceback" not in text, text
    assert len(lines) <= 2 and lines[0].startswith("error: "), text
    assert says in lines[0], text


def test_the_mistakes_table_covers_the_issue_and_matches_the_docs():
    assert len(MISTAKES) >= 41 and len({m.what for m in MISTAKES}) == len(MISTAKES)
    assert DOC.read_text() == render(DOC.read_text()), "docs/reliability.md is stale: run python tests/test_mistakes.py"


def render(doc: str) -> str:
    """`doc` with the section between the markers regenerated from MISTAKES."""
    shown = {
        "cifar": "data", "imagenet": "imagenette", "a_file": "notes.txt", "too_many": "8",
        "checkpoint": "logs/resnet20_cifar/version_0/checkpoints/last.ckpt", "typo_config": "my_resnet20.yaml",
        "broken_config": "broken.yaml", "hollow": "empty_folder", "imagenet_no_val": "imagenette_train_only",
        "imagenet_corrupt": "imagenette_with_a_bad_jpeg", "empty_checkpoint": "empty.ckpt",
        "truncated_checkpoint": "truncated.ckpt", "text_checkpoint": "notes.ckpt",
        "published_weights": "resnet20-12fca82f.th", "empty_config": "empty.yaml",
        "unknown_key_config": "max_stepz.yaml", "milestones_config": "milestones.yaml",
        "checkpoint_folder": "logs/resnet20_cifar/version_0/checkpoints",
    }  # fmt: skip
    rows = ["| mistake | command | prints (one line, exit 1) |", "|---|---|---|"]
    for mistake in MISTAKES:
        command = expand(mistake.command).format(**shown).replace("|", "\\|")
        program = "python" if command.startswith("-m ") else "python main.py"
        rows.append(f"| {mistake.what} | `{program} {command}` | `error: ...{mistake.says.format(**shown)}...` |")
    section = "\n".join([BEGIN, *rows, END])
    start, stop = doc.index(BEGIN), doc.index(END) + len(END)
    return doc[:start] + section + doc[stop:]


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
    print(f"wrote {DOC.relative_to(REPO)}")
