"""Files from elsewhere are data (docs/security.md): each payload of issue 22, built from a real tiny run, runs no
command and changes no file outside its run; the negative controls show that each payload is live."""

import contextlib
import csv
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import CONFIGS, QUIET, RunsACommand, subprocess_env, write_tiny_cifar
from resnet_lab import ImageClassifier
from resnet_lab.callbacks import RunCheckpoint
from resnet_lab.checkpoints import AtomicCheckpointIO
from resnet_lab.cli import main
from resnet_lab.data.ilsvrc_val import main as ilsvrc_val
from resnet_lab.errors import DataError, DiskFullError, UserError
from resnet_lab.files import atomic_write_text, csv_cell
from resnet_lab.paper.__main__ import main as paper
from resnet_lab.paper.ledger import README_BEGIN, README_END, read_ledger, results_table, write_readme

RUN = Path("logs/resnet20_cifar/version_0")
TINY = ["--data.val_size", "50", "--data.batch_size", "16", "--data.num_workers", "0", "--trainer.limit_val_batches",
        "1", "--trainer.limit_test_batches", "1", "--trainer.limit_train_batches", "2", *QUIET]  # fmt: skip


def cli(*args: str) -> list[str]:
    return [args[0], "--config", str(CONFIGS / "resnet20_cifar.yaml"), "--data.root", "cifar", *TINY, *args[1:]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder holding tiny CIFAR data and a real, tested 4-iteration ResNet-20 run under logs/."""
    root = tmp_path_factory.mktemp("trained")
    write_tiny_cifar(root / "cifar")
    with contextlib.chdir(root):
        main(cli("fit", "--trainer.max_steps", "4", "--test_after_fit", "true"))
    return root


@pytest.fixture
def work(trained, tmp_path, monkeypatch) -> Path:
    """A copy of `trained` of this test's own, as the working folder."""
    shutil.copytree(trained, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "w"


def snapshot(root: Path, inside: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file under `root` but those under `inside`: (size, mtime)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not (inside and (root / inside) in p.parents)
    }


def doctored(source: Path, out: Path, edit) -> Path:  # noqa: ANN001
    checkpoint = torch.load(source, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, out)
    torch.load(out, weights_only=True)  # plain values only: torch's own safe loading takes it
    return out


def system(command: str) -> dict:
    return {"class_path": "os.system", "init_args": {"command": command}}


def refused(argv: list[str], says: str, entry=main, one_line: bool = True) -> str:  # noqa: ANN001
    with pytest.raises(SystemExit) as exit_:
        entry(argv)
    message = str(exit_.value.code)
    assert message.startswith("error: ") and says in message and ("\n" not in message or not one_line), message
    return message


def lambda_lr(lr_lambda: object) -> dict:
    return {"class_path": "torch.optim.lr_scheduler.LambdaLR", "init_args": {"lr_lambda": lr_lambda}}


# Live payloads: each runs its command in Lightning's own load_from_checkpoint (the negative control below).
PAYLOADS = {
    "lr_lambda": lambda hp, cmd: hp.__setitem__("lr_scheduler", lambda_lr(system(cmd))),
    "block_kwargs": lambda hp, cmd: hp["backbone"]["init_args"].__setitem__("block_kwargs", {"x": system(cmd)}),
    # An allowed module's name before a re-exported one: jsonargparse reaches os.system as an attribute.
    "re-exported": lambda hp, cmd: hp.__setitem__(
        "lr_scheduler", lambda_lr(system(cmd) | {"class_path": "torchmetrics.os.system"})
    ),
    # A spec written as text: jsonargparse parses a string in a typed slot as YAML.
    "spec as text": lambda hp, cmd: hp.__setitem__("lr_scheduler", json.dumps(lambda_lr(system(cmd)))),
    # ... with a tab that pure-Python YAML refuses and libyaml, jsonargparse's loader, reads.
    "spec as text with a tab": lambda hp, cmd: hp.__setitem__(
        "lr_scheduler", yaml.safe_dump(lambda_lr(system(cmd))).replace("command: ", "command:\t")
    ),
}


@pytest.mark.parametrize("where", PAYLOADS)
def test_a_checkpoint_naming_a_function_runs_nothing_in_any_reader(work, where):
    marker = work.parent / "ran"
    bad = doctored(
        RUN / "checkpoints/last.ckpt",
        RUN / "checkpoints/doctored.ckpt",
        lambda c: PAYLOADS[where](c["hyper_parameters"], f"touch {marker}"),
    )
    before = snapshot(work, RUN)
    says = "which a file from elsewhere may not"
    refused(cli("test", "--ckpt_path", str(bad)), says)
    refused(cli("fit", "--ckpt_path", str(bad), "--trainer.max_steps", "6"), says)
    refused(["responses", str(bad), "--out", "figs/fig7", "--limit-batches", "1"], says, entry=paper)
    with pytest.raises(DataError, match=says):
        ImageClassifier.load_from_checkpoint(bad)
    assert not marker.exists() and snapshot(work, RUN) == before

    # Negative control: Lightning's own load_from_checkpoint builds what the file names, and the command runs.
    with contextlib.suppress(Exception):
        super(ImageClassifier, ImageClassifier).load_from_checkpoint(bad)
    assert marker.exists()


NAMES = {
    "a function in a type slot": ("backbone.init_args.block", "shutil.rmtree"),
    "an allowed module's unpickling function": ("lr_scheduler", lambda_lr(
        {"class_path": "torchvision.models._api.load_state_dict_from_url", "init_args": {"url": "http://127.0.0.1:9/x"}}
    )),
    "a builtin through __main__": ("lr_scheduler", lambda_lr("__main__.__builtins__.exec")),
    "torch.save through a module's import": ("lr_scheduler", lambda_lr("torch.nn.modules.module.torch.save")),
}  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_names_outside_the_allowed_classes_are_refused(work, name):
    key, value = NAMES[name]

    def edit(checkpoint: dict) -> None:
        *parents, last = key.split(".")
        tree = checkpoint["hyper_parameters"]
        for parent in parents:
            tree = tree[parent]
        tree[last] = value

    bad = doctored(RUN / "checkpoints/last.ckpt", work / "named.ckpt", edit)
    refused(cli("test", "--ckpt_path", str(bad)), "which a file from elsewhere may not build")
    with pytest.raises(DataError, match="which a file from elsewhere may not build"):
        ImageClassifier.load_from_checkpoint(bad)


def test_older_hyperparameter_keys_and_an_hparams_file_are_checked(work):
    marker = work.parent / "ran"

    def legacy(checkpoint: dict) -> None:
        del checkpoint["hyper_parameters"]["lr_scheduler"]
        checkpoint["hparams"] = {"lr_scheduler": lambda_lr(system(f"touch {marker}"))}

    bad = doctored(RUN / "checkpoints/last.ckpt", work / "legacy.ckpt", legacy)
    with pytest.raises(DataError, match=r"hparams\.lr_scheduler\.init_args\.lr_lambda\.class_path names 'os\.system'"):
        ImageClassifier.load_from_checkpoint(bad)
    hparams = torch.load(RUN / "checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]
    hparams["lr_scheduler"] = lambda_lr(system(f"touch {marker}"))
    with (work / "hparams.csv").open("w", newline="") as f:  # Lightning reads each value with ast.literal_eval
        csv.writer(f).writerows([("key", "value"), *((k, repr(v)) for k, v in hparams.items())])
    with pytest.raises(DataError, match="names 'os.system'"):
        ImageClassifier.load_from_checkpoint(RUN / "checkpoints/last.ckpt", hparams_file=work / "hparams.csv")
    assert not marker.exists()
    with contextlib.suppress(Exception):  # negative controls: Lightning's reader builds both
        super(ImageClassifier, ImageClassifier).load_from_checkpoint(bad)
    assert marker.exists()
    marker.unlink()
    with contextlib.suppress(Exception):
        super(ImageClassifier, ImageClassifier).load_from_checkpoint(
            RUN / "checkpoints/last.ckpt", hparams_file=work / "hparams.csv"
        )
    assert marker.exists()


def test_own_checkpoints_load_and_resume_as_before(work):
    model = ImageClassifier.load_from_checkpoint(RUN / "checkpoints/last.ckpt")
    assert model.backbone.depth == 20
    main(cli("test", "--ckpt_path", "last"))
    main(
        cli("fit", "--ckpt_path", "last", "--trainer.max_steps", "6", "--trainer.logger.init_args.version", "version_0")
    )
    assert torch.load(RUN / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 6
    # `test --ckpt_path last` logged into the run it tested, as a test of its checkpoint's path does.
    assert sorted(p.name for p in RUN.parent.iterdir()) == ["version_0"] and (RUN / "config-test.yaml").is_file()


def test_a_file_named_in_place_of_a_value_is_not_read_as_a_config(work):
    marker = work.parent / "ran"
    (RUN / "notes.txt").write_text(json.dumps(lambda_lr(system(f"touch {marker}"))))
    bad = doctored(RUN / "checkpoints/last.ckpt", work / "file.ckpt",
                   lambda c: c["hyper_parameters"].__setitem__("lr_scheduler", str(RUN / "notes.txt")))  # fmt: skip
    refused(cli("test", "--ckpt_path", str(bad)), "names the file")
    assert not marker.exists()


def test_another_run_in_the_experiment_cannot_run_code_when_last_is_resolved(work, monkeypatch):
    marker = work.parent / "ran"
    monkeypatch.syspath_prepend(str(work))  # as `python -m` or a working folder on PYTHONPATH has it
    foreign = RUN.parent / "version_9"
    shutil.copytree(RUN, foreign)
    (foreign / "payload.py").write_text(f"import os\nos.system('touch {marker}')\nclass Cb:\n    pass\n")
    config = yaml.safe_load((foreign / "config.yaml").read_text())
    config["trainer"]["callbacks"] = [{"class_path": "logs.resnet20_cifar.version_9.payload.Cb"}]
    (foreign / "config.yaml").write_text(yaml.safe_dump(config))
    os.utime(foreign / "checkpoints" / "last.ckpt")  # the newest: `last` would take it if it had the same settings
    tests = len(json.loads((RUN / "run.json").read_text())["tests"])
    main(cli("test", "--ckpt_path", "last"))  # evaluates this command's own run, version_0
    assert not marker.exists() and len(json.loads((RUN / "run.json").read_text())["tests"]) == tests + 1
    importlib.import_module("logs.resnet20_cifar.version_9.payload")  # negative control: importing it runs it
    assert marker.exists()


def test_a_run_folder_cannot_make_paper_responses_download_or_write_elsewhere(work):
    outside = work.parent / "outside" / "deep"
    config = yaml.safe_load((RUN / "config.yaml").read_text())
    config["data"]["init_args"] |= {"root": str(outside), "download": True}
    (RUN / "config.yaml").write_text(yaml.safe_dump(config))
    refused(["responses", str(RUN / "checkpoints/last.ckpt"), "--out", "figs/fig7"], "no CIFAR10 found", paper)
    assert not outside.parent.exists()


def test_a_forks_own_classes_load_where_its_own_code_names_them(work, monkeypatch):
    (work / "securefork").mkdir()  # not docs/extending.md's `myfork`, which another test imports
    (work / "securefork" / "__init__.py").write_text("")
    (work / "securefork" / "blocks.py").write_text(
        "from resnet_lab.models import BasicBlock\n\n\nclass Mine(BasicBlock):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(work))
    block = ["--model.backbone.init_args.block", "securefork.blocks.Mine"]
    main(cli("fit", *block, "--experiment", "fork", "--trainer.max_steps", "2"))
    last = work / "logs/fork/version_0/checkpoints/last.ckpt"
    # The command's config names the class: the fork's runs test and resume as the project's do.
    main(["test", "--config", str(last.parents[1] / "config.yaml"), "--ckpt_path", str(last), *TINY])
    version = ["--trainer.logger.init_args.version", "version_0"]
    main(cli("fit", *block, "--experiment", "fork", "--trainer.max_steps", "4", "--ckpt_path", "last", *version))
    assert torch.load(last, weights_only=True)["global_step"] == 4
    # In Python, the fork names its own package; unnamed, its class is one a file from elsewhere may not build.
    with pytest.raises(DataError, match="names 'securefork.blocks.Mine', which a file from elsewhere may not build"):
        ImageClassifier.load_from_checkpoint(last)
    model = ImageClassifier.load_from_checkpoint(last, trusted_modules=["securefork"])
    assert type(model.backbone.layer1[0]).__name__ == "Mine"


def test_a_url_and_unresolvable_aliases_are_refused_and_hpc_is_checked(work):
    marker = work.parent / "ran"
    with pytest.raises(UserError, match="a URL or a stream is not read"):
        ImageClassifier.load_from_checkpoint("http://127.0.0.1:9/x.ckpt")
    refused(cli("test", "--ckpt_path", "http://127.0.0.1:9/x.ckpt"), "a URL is not read")
    refused(cli("test", "--ckpt_path", "best"), "give the file's path")
    refused(cli("test", "--ckpt_path", "registry"), "give the file's path")
    refused(cli("test", "--ckpt_path", "hpc"), "no hpc_ckpt_<N>.ckpt in")
    torch.save({"state_dict": {}, "payload": RunsACommand(marker)}, work / "hpc_ckpt_1.ckpt")
    refused(cli("test", "--ckpt_path", "hpc", "--weights_only", "false"), "hpc_ckpt_1.ckpt is not a readable")
    assert not marker.exists()
    # hpc goes through the checks of a path: a good one is tested, a doctored one refused.
    shutil.copy(RUN / "checkpoints/last.ckpt", work / "hpc_ckpt_2.ckpt")
    main(cli("test", "--ckpt_path", "hpc"))
    doctored(
        work / "hpc_ckpt_2.ckpt",
        work / "hpc_ckpt_3.ckpt",
        lambda c: PAYLOADS["lr_lambda"](c["hyper_parameters"], "true"),
    )
    refused(cli("test", "--ckpt_path", "hpc"), "names 'os.system'")
    torch.load(work / "hpc_ckpt_1.ckpt", weights_only=False)  # negative control: the payload is live
    assert marker.exists()


def test_last_in_a_run_of_another_network_is_refused(work):
    doctored(
        RUN / "checkpoints/last.ckpt",
        RUN / "checkpoints/last.ckpt",
        lambda c: c["hyper_parameters"]["backbone"]["init_args"].__setitem__("residual", False),
    )
    tests = len(json.loads((RUN / "run.json").read_text())["tests"])
    refused(cli("test", "--ckpt_path", "last"), "holds another network than the config names (residual False")
    assert len(json.loads((RUN / "run.json").read_text())["tests"]) == tests


@pytest.mark.parametrize(
    "path", ["local://{victim}", "{run}/checkpoints/../../../victim", "{victim}", "{run}/checkpoints/inside"]
)
def test_checkpoint_state_cannot_delete_outside_its_run(work, path):
    victim = work / "victim"
    (victim / "inside").mkdir(parents=True)
    (victim / "inside" / "precious.txt").write_text("data")
    target = path.format(victim=victim, run=RUN)
    (RUN / "checkpoints" / "inside").mkdir()  # a folder in the run's checkpoints/: Lightning would delete it whole

    def edit(checkpoint: dict) -> None:
        for state in (v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")):
            state["best_model_path"] = state["kth_best_model_path"] = state["last_model_path"] = target
            state["best_k_models"] = {target: torch.tensor(0.0)}

    doctored(RUN / "checkpoints/last.ckpt", RUN / "checkpoints/last.ckpt", edit)
    before = snapshot(work, RUN)
    with pytest.warns(UserWarning, match="names files outside"):
        main(cli("fit", "--ckpt_path", "last", "--trainer.max_steps", "6", "--trainer.logger.init_args.version",
                 "version_0", "--checkpoint.save_top_k", "1"))  # fmt: skip
    assert (victim / "inside" / "precious.txt").read_text() == "data" and snapshot(work, RUN) == before
    assert (RUN / "checkpoints" / "inside").is_dir()

    # Negative control: Lightning's ModelCheckpoint keeps the path it would delete; ours keeps nothing outside.
    callbacks = torch.load(next(RUN.glob("checkpoints/best-step*.ckpt")), weights_only=True)["callbacks"]
    state = next(v for k, v in callbacks.items() if k.startswith("ModelCheckpoint{'monitor': None"))
    state = {**state, "best_model_path": target}
    theirs, ours = ModelCheckpoint(dirpath=state["dirpath"]), RunCheckpoint(dirpath=state["dirpath"])
    theirs.load_state_dict(dict(state))
    ours.load_state_dict(dict(state))
    assert theirs.best_model_path == target and ours.best_model_path == ""


def test_names_that_become_paths_are_checked(work):
    before = snapshot(work)
    refused(cli("fit", "--experiment", "../../../x", "--trainer.max_steps", "2"), "--experiment '../../../x'")
    refused(cli("fit", "--trainer.logger.init_args.version", "../../x", "--trainer.max_steps", "2"),
            "--trainer.logger.init_args.version '../../x'")  # fmt: skip
    refused(cli("fit", "--trainer.logger.init_args.name", "/tmp/x", "--trainer.max_steps", "2"), "a run folder's name")
    assert snapshot(work) == before

    escaped = "x/../../../../escaped"
    doctored(RUN / "checkpoints/last.ckpt", RUN / "checkpoints/last.ckpt",
             lambda c: c["callbacks"]["RunRecord"].__setitem__("run_id", escaped))  # fmt: skip
    refused(cli("fit", "--ckpt_path", "last", "--trainer.max_steps", "6", "--trainer.logger.init_args.version",
                "version_0"), "is not a run id")  # fmt: skip
    record = json.loads((RUN / "run.json").read_text())
    (RUN / "run.json").write_text(json.dumps(record | {"run_id": escaped}))
    refused(["record", str(RUN), "--ledger", "results"], "is not a run id", entry=paper)
    (RUN / "run.json").write_text(json.dumps(record))
    config = yaml.safe_load((RUN / "config.yaml").read_text())
    config["data"]["class_path"] = "resnet_lab.data./../../../escaped"  # the dataset's name names the ledger file
    (RUN / "config.yaml").write_text(yaml.safe_dump(config))
    refused(["record", str(RUN), "--ledger", "results"], "data.class_path does not end in a class name", paper)
    assert not (work / "results").exists() and not list(work.parent.parent.glob("escaped*"))


@pytest.mark.parametrize("wnid", ["../../x", "/abs/x", "n0144076"])
def test_a_label_file_cannot_place_images_outside_out(tmp_path, wnid):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"jpeg")
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000001,{wnid} 1 2 3 4\n")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        ilsvrc_val([str(images), str(labels), "--out", str(tmp_path / "out" / "val")])
    assert f"wnid {wnid!r} is not an ImageNet synset id" in str(exit_.value.code)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists() and not Path("/abs/x").exists()


def test_a_run_folder_config_naming_lambda_is_refused(work):
    marker = work.parent / "ran"
    config = yaml.safe_load((RUN / "config.yaml").read_text())
    config["data"]["init_args"]["augmentations"] = [
        {"class_path": "resnet_lab.data.EachImage", "init_args": {"transform": {
            "class_path": "torchvision.transforms.v2.Lambda", "init_args": {"lambd": system(f"touch {marker}")}}}}
    ]  # fmt: skip
    (RUN / "config.yaml").write_text(yaml.safe_dump(config))
    refused(["responses", str(RUN / "checkpoints/last.ckpt"), "--out", "figs/fig7"], "Lambda", entry=paper)
    assert not marker.exists() and not (work / "figs").exists()


def _ledger(work: Path) -> Path:
    main(cli("test", "--ckpt_path", str(RUN / "checkpoints/last.ckpt")))
    paper(["record", str(RUN), "--ledger", "results"])
    return work / "results" / "cifar10.csv"


def test_ledger_and_curve_files_from_elsewhere_are_refused_row_by_row(work):
    ledger = _ledger(work)
    rows = list(csv.DictReader(ledger.open()))
    bad = [
        rows[0] | {"test_err_top1": "seven"},
        rows[0] | {"test_subset": "test_range [0]"},
        rows[0] | {"backbone": "{not json"},
        rows[0] | {"schedule_scale": ""},
    ]
    with ledger.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(bad)
    with pytest.raises(DataError) as error:
        read_ledger(work / "results")
    lines = str(error.value).splitlines()
    assert lines == [
        f"{ledger}:2: column test_err_top1: expected a number, got 'seven'",
        f"{ledger}:3: column test_subset: expected full or test_range [<start>, <stop>], then optionally "
        "'; <limit>', got 'test_range [0]'",
        f"{ledger}:4: column backbone: expected the backbone's arguments as a JSON object, got '{{not json'",
        f"{ledger}:5: column schedule_scale: expected a number in (0, 1], got ''",
    ]
    refused(["results", "--ledger", "results"], "column test_err_top1: expected a number", paper, one_line=False)

    curve = next((work / "results" / "curves").rglob("*.json"))
    content = json.loads(curve.read_text())
    del content["val"]
    curve.write_text(json.dumps(content))
    refused(["curves", str(curve), "--out", "figs/c"], "key 'val': expected a list of [step, error] pairs, it is "
            "missing", entry=paper)  # fmt: skip


def test_the_readme_block_is_regenerated_wholly_and_cells_are_escaped(work):
    ledger = _ledger(work)
    rows = list(csv.DictReader(ledger.open()))
    injected = f"x {README_END}<img src=x onerror=alert(1)>| y"
    readme = work / "README.md"
    readme.write_text(f"# Title\n{README_BEGIN}\n| {injected} |\n{README_END}\nafter\n")
    with ledger.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows([rows[0] | {"experiment": injected}])
    table = results_table(read_ledger(work / "results"))
    assert README_END not in table and "<img" not in table and r"x &lt;!-- /results --&gt;&lt;img" in table
    assert all(line.count(" | ") == 12 for line in table.splitlines() if line.startswith("| cifar10"))
    write_readme(readme, table)
    text = readme.read_text()
    assert text.count(README_END) == 1 and "<img" not in text and text.endswith(f"{README_END}\nafter\n")


def test_csv_cells_a_spreadsheet_would_run_are_neutralised(work):
    record = json.loads((RUN / "run.json").read_text())
    (RUN / "run.json").write_text(json.dumps(record | {"device": '=HYPERLINK("http://x","y")'}))
    ledger = _ledger(work)
    assert next(csv.DictReader(ledger.open()))["device"] == '\'=HYPERLINK("http://x","y")'
    assert [csv_cell(v) for v in ("-1.5", "+3", "@x", "-x", 7)] == ["-1.5", "+3", "'@x", "'-x", 7]


KILLED_WRITER = """
import sys, torch
from pathlib import Path
from resnet_lab.checkpoints import AtomicCheckpointIO
io, last = AtomicCheckpointIO(), Path(sys.argv[1])
io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, last)
print("saved", flush=True)
while True:
    io.save_checkpoint({"step": 2, "w": torch.zeros(64 * 2**20)}, last)  # 256 MiB: long enough to be killed in
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's folder")
    last = tmp_path / "checkpoints" / "last.ckpt"
    env = subprocess_env() | {"TMPDIR": "/dev/shm"}  # the system temp folder on another file system
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(last)], env=env, stdout=subprocess.PIPE)
    assert writer.stdout.readline().strip() == b"saved"
    deadline = time.monotonic() + 60
    while not list(last.parent.glob(".last.ckpt.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.001)
    writer.send_signal(signal.SIGKILL)  # within a millisecond of the write's start: 256 MiB take far longer
    writer.wait()
    assert torch.load(last, weights_only=True)["step"] == 1
    AtomicCheckpointIO().save_checkpoint({"step": 3}, last)  # the next write clears what the killed one left
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here (needs root)")
    try:
        last = disk / "last.ckpt"
        io = AtomicCheckpointIO()
        io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, last)
        with pytest.raises(DiskFullError, match=rf"no space left in {disk} to write last.ckpt \(\d+ MiB free"):
            io.save_checkpoint({"step": 2, "w": torch.zeros(2**20 * 2)}, last)  # 8 MiB
        assert torch.load(last, weights_only=True)["step"] == 1 and [p.name for p in disk.iterdir()] == ["last.ckpt"]
        with pytest.raises(DiskFullError):
            atomic_write_text(disk / "run.json", "x" * 2**23)
        # ... and the command line says it in one line: a run whose save_dir is that file system.
        write_tiny_cifar(tmp_path / "cifar")
        os.chdir(tmp_path)
        refused(cli("fit", "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(disk / "logs"),
                    "--model.backbone.init_args.depth", "110"), "no space left in")  # fmt: skip
    finally:
        subprocess.run(["umount", str(disk)], check=True)
