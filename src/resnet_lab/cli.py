"""The command line: `python main.py {fit,validate,test,predict} --config configs/<experiment>.yaml`."""

import sys
import warnings
from functools import partial
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from resnet_lab.checkpoints import (
    check_checkpoint_for,
    model_arguments,
    resolve_alias,
)
from resnet_lab.data.base import ClassificationDataModule
from resnet_lab.errors import ConfigError
from resnet_lab.identity import (
    HOW_TO_RUN,
    SAME_TRAINING,
    check_run_name,
    config_overrides,
    module_class,
    run_differences,
    run_name,
    run_to_resume,
)
from resnet_lab.launch import (
    check_config_after_subcommand,
    check_writable,
    error_message,
    expand_recipes,
    experiment_config,
    link_num_classes,
    user_error,
)
from resnet_lab.module import GRAPH_STEP_MOVED, ImageClassifier
from resnet_lab.parser import ResNetLabParser
from resnet_lab.records import RunRecord
from resnet_lab.scaled import scale_schedule
from resnet_lab.trainer import CONFIGURED_CALLBACKS
from resnet_lab.trainer import Trainer as ResNetLabTrainer

# main.py hands LightningCLI the command line with each config's recipes read before it, which Lightning warns of
# when sys.argv holds arguments too.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")

SUBCOMMAND_HELP = {
    "fit": "train a network: a run folder under logs/<experiment>/ (config, TensorBoard events, checkpoints); "
    "`--model.help ImageClassifier` lists the module's options",
    "validate": "evaluate weights on the validation split (a run's checkpoint: logged into that run)",
    "test": "evaluate weights on the test set (a run's checkpoint: logged into that run, where `table` finds it)",
    "predict": "class probabilities of the test images from the given weights",
}
CKPT_PATH_HELP = {
    "fit": "a checkpoint to resume from, or `last`: the run this command names (the folder "
    "--trainer.logger.init_args.version names, else the newest run of the experiment with this command's settings, "
    "seed included); it goes on in that run's folder",
    "evaluate": "the weights to evaluate: a checkpoint (a run's checkpoints/last.ckpt or best-step<N>.ckpt, whose "
    "run the results are logged into), or `last`: the newest run of the experiment with this network and seed",
}
LOG_DIR = "logs"
UNNAMED_RUN = "default"


class ResNetLabCLI(LightningCLI):
    """LightningCLI with the data module's class count handed to the backbone, best-on-validation and latest
    checkpoints (`--ckpt_path last` resumes the newest run in its own folder), a checkpoint and a clean exit on
    SIGTERM/SIGUSR1, per-step learning-rate and speed logging, a validation at the last step, TensorBoard runs
    (with hyperparameters and the network graph) under `logs/<experiment>/`, each config read after the recipe it
    names, and a progress bar redrawn a few times a second rather than after every iteration."""

    def __init__(self, args: ArgsType = None, **kwargs) -> None:
        self.run_record: RunRecord | None = None  # set once the config is parsed
        self.how_to_run: dict[str, object] = {}
        self.module_class: str | None = None  # the command's own, before a checkpoint's is merged in
        self.config_as_given: Namespace | None = None  # what config.yaml keeps of a scaled fit
        args = sys.argv[1:] if args is None else args  # the command line, given on as arguments (sys.argv is left)
        if isinstance(args, list):
            check_config_after_subcommand(args)
        self.named_config = experiment_config(args) if isinstance(args, list) else None
        args = expand_recipes(args) if isinstance(args, list) else args
        super().__init__(
            ImageClassifier,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            trainer_class=ResNetLabTrainer,
            args=args,
            parser_class=ResNetLabParser,
            # Each subcommand's help says what it does here, and what our `--ckpt_path last` means (Lightning's help
            # of the option describes its own `last`).
            parser_kwargs={
                name: {"description": f"{text}. --ckpt_path: {CKPT_PATH_HELP['fit' if name == 'fit' else 'evaluate']}"}
                for name, text in SUBCOMMAND_HELP.items()
            },
            **kwargs,
        )

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        # An abbreviation is an easy typo to miss (`--trainer.max_step` would set max_steps); jsonargparse 5 drops
        # them as well.
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault(
            "description",
            "Train and evaluate the paper's residual and plain networks: `fit` makes a run folder under "
            "logs/<experiment>/; `validate`, `test` and `predict` evaluate a run's checkpoint and log into that run, "
            "where `table` finds it. `main.py <subcommand> --help` lists each one's options; `main.py fit --model.help "
            "ImageClassifier` and `--data.help CIFAR10DataModule` list those of the module and of a data module.",
        )
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self.parser.subcommand_parsers.append(parser)  # for its one-line errors' "did you mean"
        parser.add_argument(
            "--recipe",
            type=str | list[str] | None,
            default=None,
            help="in a config file: the recipe it stacks on (a config file, relative to this one), read before it; or "
            "a list of them, read in order (a recipe and presets)",
        )
        parser.add_argument(
            "--experiment",
            type=str | None,
            default=None,
            help="the run folder's name under logs/ (each experiment config sets it; default: the first --config)",
        )
        parser.add_argument(
            "--paper_recipe",
            type=bool,
            default=True,
            help="whether the run trains the paper's recipe; every recipe-switch preset (configs/presets/) and the "
            "modern experiments set it false, and the paper's figure is then never shown beside the run's",
        )
        parser.add_argument(
            "--schedule_scale",
            type=float,
            default=1.0,
            help="fit only: train this fraction of the schedule with its shape kept, e.g. 0.0625 for 1/16: epochs "
            "of that fraction of the data, and every count of iterations (max_steps, the milestones of an "
            "iteration-wise lr schedule, an iteration val_check_interval) multiplied by it; warm-up rules unchanged. "
            "The run goes to logs/<experiment>-scale1of16/",
        )
        # A fork's own module is `--model myfork.Module` (a subclass of ImageClassifier), ImageClassifier unless named.
        parser.set_defaults({"model": {"class_path": f"{ImageClassifier.__module__}.{ImageClassifier.__qualname__}"}})
        for name, (kind, defaults) in CONFIGURED_CALLBACKS.items():
            parser.add_lightning_class_args(kind, name)
            parser.set_defaults({f"{name}.{key}": value for key, value in defaults.items()})
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: then test the final weights (the paper's protocol) and log test/* into the same run",
        )
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {
                        "save_dir": LOG_DIR,
                        "name": UNNAMED_RUN,
                        "log_graph": True,
                        "default_hp_metric": False,
                    },
                }
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Then check the checkpoint, before LightningCLI merges its hyper-parameters into the config and jsonargparse
        builds every class they name (`check_checkpoint_for`), Lightning's aliases resolved or refused first
        (`resolve_alias`; our `last` in `_resume_last_run`, once the run is known)."""
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "")
        if not isinstance(config, Namespace) or not config.get("ckpt_path"):
            return
        # How the model runs is this command's, whichever path wrote the checkpoint: restored after the merge.
        self.how_to_run = {key: model_arguments(config).get(key) for key in HOW_TO_RUN}
        self.module_class = config.model.get("class_path")
        path = resolve_alias(str(config.ckpt_path), config.trainer.get("default_root_dir"))
        if path is not None:
            config.ckpt_path = path
            check_checkpoint_for(config, path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key, value in self.how_to_run.items():  # see parse_arguments
            if value is not None and model_arguments(config).get(key) is not None:
                model_arguments(config)[key] = value
        if model_arguments(config).get("graph_step"):  # the user's own: a checkpoint's was replaced just above
            raise ConfigError(f"--model.graph_step true: {GRAPH_STEP_MOVED}")
        ours, theirs = self.module_class, config.model.get("class_path")  # theirs: a checkpoint's, once merged
        if ours is not None and {module_class(ours), module_class(theirs)} <= SAME_TRAINING:
            config.model.class_path = ours
        link_num_classes(config)
        config.recipe = None  # the saved config holds every value itself: no recipe to read before it
        # One folder per experiment, named by the config (`experiment:`) unless the user named the run.
        init_args = getattr(config.trainer.logger, "init_args", None)
        scale = config.get("schedule_scale")
        scale = 1.0 if scale is None else scale
        if init_args is not None and init_args.get("name") == UNNAMED_RUN:
            name = config.get("experiment") or (Path(self.named_config).stem if self.named_config else None)
            if name:
                init_args.name = run_name(name, scale if self.subcommand == "fit" else 1.0)
        for key in ("name", "version"):  # each becomes a folder under save_dir
            if init_args is not None and init_args.get(key) not in (None, ""):
                check_run_name(f"--trainer.logger.init_args.{key}", init_args.get(key))
        if self.subcommand in ("validate", "test", "predict") and not config.get("ckpt_path"):
            weights = (model_arguments(config).backbone.get("init_args") or Namespace()).get("weights")
            if weights is None:  # a torchvision network with its `weights` is the one net that needs no checkpoint
                raise ConfigError(
                    f"{self.subcommand} needs trained weights: --ckpt_path <run>/checkpoints/last.ckpt (or `last`, the "
                    "newest run of the experiment); without them it would evaluate the untrained network"
                )
        # TensorBoard's HPARAMS tab: the settings of the model, the data and the trainer (not where it logs).
        plain = config.as_dict()
        trainer = {k: v for k, v in plain["trainer"].items() if k not in ("logger", "callbacks")}
        module = {"class": config.model.get("class_path"), **model_arguments(config).as_dict()}
        settings = {"model": module, "data": plain["data"], "trainer": trainer}
        if self.subcommand == "fit":
            protocol = {"schedule_scale": scale}  # run.json keeps it; a resume with another is refused
            self.run_record = RunRecord(config.get("experiment"), self._overrides(config), protocol, settings)
            self.config_as_given = config.clone()  # config.yaml keeps the schedule before its scale
            scale_schedule(config, scale)
        else:  # a test adds its result to the run; the others only need it present when a checkpoint holds one
            self.run_record = RunRecord(config.get("experiment"), settings=settings)
            # The checkpoint's folder written as given (relative or absolute, or the run folder since copied): its
            # ModelCheckpoint state is not needed to evaluate.
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
        if init_args is not None and init_args.get("save_dir"):
            check_writable(Path(init_args.save_dir))
            if config.get("ckpt_path") == "last":
                self._resume_last_run(config, Path(init_args.save_dir) / init_args.name)
            if self.subcommand != "fit":  # into the run of the checkpoint, `last`'s too
                self._log_beside_the_run(config, init_args)

    def _log_beside_the_run(self, config: Namespace, logger: Namespace) -> None:
        """An evaluation of a run's checkpoint (`<run>/checkpoints/*.ckpt`) logs into that run, beside its training
        curves, where `table` finds its test error; its config goes to config-<subcommand>.yaml, so the run's
        config.yaml stays the one it trained with. Other evaluations get a folder of their own."""
        ckpt = Path(str(config.get("ckpt_path") or ""))
        run = ckpt.parent.parent
        if ckpt.parent.name != "checkpoints" or not ckpt.is_file() or not (run / "config.yaml").is_file():
            if (
                logger.get("version") is not None
                and (Path(logger.save_dir) / str(logger.get("name")) / str(logger.version) / "config.yaml").is_file()
            ):
                logger.version = None  # a run's own config.yaml, read for another checkpoint: not into that run
            return
        logger.save_dir, logger.name, logger.version = str(run.parent.parent), run.parent.name, run.name
        logger.log_graph = False  # the run holds its graph already
        self.save_config_kwargs = {
            **self.save_config_kwargs,
            "config_filename": f"config-{self.subcommand}.yaml",
            "overwrite": True,
        }

    def _parse_alone(self, args: list[str], *more: str | Path) -> Namespace | None:
        """This subcommand's config from `args` and `more` alone (None if they do not parse on their own)."""
        exit_on_error, self.parser.exit_on_error = self.parser.exit_on_error, False  # raise, print nothing
        try:
            return self.parser.parse_args([self.subcommand, *args, *map(str, more)])[self.subcommand]
        except Exception:  # noqa: BLE001 - the experiment alone may need what the command added
            return None
        finally:
            self.parser.exit_on_error = exit_on_error

    def _overrides(self, config: Namespace) -> list[str] | None:
        """How this run differs from its experiment's config (the first --config, with its recipe) read alone."""
        base = self._parse_alone(expand_recipes(["--config", self.named_config])) if self.named_config else None
        return None if base is None else config_overrides(config, base)

    def _resume_last_run(self, config: Namespace, experiment: Path) -> None:
        """`--ckpt_path last`: see `run_to_resume`; `fit` goes on in that run's folder, so its TensorBoard curves
        continue where they stopped."""
        version = config.trainer.logger.init_args.get("version") if self.subcommand == "fit" else None
        mine = self.config_as_given if self.config_as_given is not None else config
        parse = partial(self._parse_alone, ["--config"])
        differences = partial(run_differences, mine, parse=parse, evaluation=self.subcommand != "fit")
        last, why = run_to_resume(experiment, version, differences)
        check_checkpoint_for(config, str(last))
        config.ckpt_path = str(last)
        if self.subcommand == "fit":
            config.trainer.logger.init_args.version = last.parents[1].name
            # config.yaml stays the run's original; the resumed command's config is saved beside it.
            self.save_config_kwargs = {
                **self.save_config_kwargs,
                "config_filename": "config-resumed.yaml",
                "overwrite": True,
            }
        # The run's own checkpoint folder, written to again: Lightning's warning that it is not empty says nothing.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        rank_zero_info(f"{'resuming from' if self.subcommand == 'fit' else 'evaluating'} {last}: {why}")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        if self.run_record is not None:
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            callbacks = config["trainer"].get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            kwargs.setdefault("callbacks", [*callbacks, self.run_record])
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.callbacks:
            if isinstance(callback, SaveConfigCallback) and self.config_as_given is not None:
                callback.config = self.config_as_given
        if isinstance(self.datamodule, ClassificationDataModule):
            self.datamodule.batch_share(trainer.world_size)  # refused here, not after the processes start
        if self.subcommand == "fit":
            self.model.check_trainer(trainer)
        return trainer

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def main(args: ArgsType = None) -> None:
    try:
        ResNetLabCLI(args=args)
    except Exception as err:
        _close_process_group()
        mistake = user_error(err)
        mistake = error_message(mistake) if mistake is not None else None
        if mistake is None and isinstance(err, MisconfigurationException):
            # Lightning's own word for a setting it cannot run with (e.g. a --schedule_scale that leaves an epoch
            # less than one batch): one line, as for ours.
            mistake = f"Lightning cannot run this configuration: {str(err).splitlines()[0]}"
            if "limit_train_batches" in mistake:
                mistake += " (with --schedule_scale, which shortens each epoch, choose a larger scale)"
        if mistake is None:
            raise
        sys.exit(f"error: {mistake}")
    _close_process_group()


def _close_process_group() -> None:
    """Destroy a data-parallel run's process group before the interpreter exits: left to the interpreter's own
    teardown, gloo's aborted a process at exit now and then ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
