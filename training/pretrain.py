"""`aet pretrain`: train an autoencoder on a data set and evaluate its codes.

Writes `runs/<name>/`: config.json, checkpoint.pt (latest, resumable), best.pt (best validation,
with the evaluation: what `aet export` reads), metrics.json, loss_curve.png, latent_2d.png and,
for images, reconstructions.png. The defaults are the shipped digits encoder: a stacked
denoising autoencoder (Gaussian noise, tied weights) with 8-dimensional codes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aet.config import ConfigError, add_config_arguments, config_from_args, flat_dict
from aet.errors import UserError
from aet.training.checkpoint import load_checkpoint, save_checkpoint
from aet.training.data import Dataset, require_classes
from aet.training.dataspec import DataSpec
from aet.training.distributed import ProcessGroup
from aet.training.evaluate import encode_array, evaluate_autoencoder, format_evaluation
from aet.training.models import (
    Autoencoder,
    ModelConfig,
    build_autoencoder,
)
from aet.training.plots import plot_latent_2d, plot_loss_curves, plot_reconstructions
from aet.training.recipes import load_recipe, recipe_names
from aet.training.train import Trainer, TrainingConfig, TrainingInterrupted

EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
EXIT_SLICE_ENDED = 75  # sysexits' EX_TEMPFAIL: --stop-after-epochs ended the call; resume later
N_RECONSTRUCTIONS = 10


@dataclass
class PretrainConfig:
    """Everything `aet pretrain` does, as flags or TOML fields."""

    # run folder
    name: str | None = field(
        default=None,
        metadata={
            "help": "run name, the folder under --runs-dir "
            "(default: <dataset>-<architecture>-<code-size>)"
        },
    )
    runs_dir: Path = field(default=Path("runs"), metadata={"help": "folder holding run folders"})
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "start from a shipped preset (training/recipes/NAME.toml); --config and "
            "flags override its fields",
            "choices": recipe_names(),
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue the run from its checkpoint.pt (same model configuration)"},
    )
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    threads: int = field(
        default=1,
        metadata={
            "help": "torch CPU threads; small models train fastest on one, "
            "above all on a busy machine"
        },
    )
    # evaluation
    probe_labels: list[int] = field(
        default_factory=lambda: [100, 1000],
        metadata={
            "help": "label counts for the linear probe (all training labels are always added)"
        },
    )
    probes: bool = field(
        default=True,
        metadata={
            "help": "after training, tune and score the probes (logistic, k-NN) on the codes, "
            "pixels and PCA; --no-probes measures the reconstruction error alone (the probes' "
            "cross-validation takes minutes on large data sets)"
        },
    )

    def __post_init__(self) -> None:
        self.data = self.data.with_defaults()
        self.training = dataclasses.replace(self.training, seed=self.seed)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(
                f"val_fraction: early stopping needs a validation split, a fraction "
                f"in (0, 1); got {self.val_fraction}"
            )
        if self.threads < 1:
            raise ConfigError(f"threads: expected a positive integer; got {self.threads}")
        if any(n < 1 for n in self.probe_labels):
            raise ConfigError(
                f"probe_labels: expected positive label counts; got {self.probe_labels}"
            )
        if self.name is not None and (
            not self.name or "/" in self.name or self.name in (".", "..")
        ):
            raise ConfigError(f"name: expected a folder name without '/'; got {self.name!r}")

    @property
    def seed(self) -> int:
        """The data's seed, which also seeds initialisation, shuffling, noise and probes."""
        assert self.data.seed is not None  # filled in by __post_init__
        return self.data.seed

    @property
    def val_fraction(self) -> float:
        assert self.data.val_fraction is not None  # filled in by __post_init__
        return self.data.val_fraction

    @property
    def run_name(self) -> str:
        return self.name or f"{self.data.name}-{self.model.architecture}-{self.model.code_size}"

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_name

    def load_dataset(self) -> Dataset:
        """The data set and split these settings name (`aet export` reloads the same rows)."""
        dataset = self.data.load()
        if dataset.is_vectors and self.training.noise == "salt-and-pepper":
            raise ConfigError(
                "noise: salt-and-pepper sets entries to 0 or 1, which means nothing for "
                "standardised features; use gaussian or masking for vectors"
            )
        if dataset.is_vectors and self.training.augmentation.enabled:
            raise ConfigError(
                "augment_translate / augment_rotate / augment_scale: augmentation moves images; "
                f"data set {self.data.name} holds vectors (set them to 0)"
            )
        return dataset

    def trainer(
        self, dataset: Dataset, run_dir: Path, group: ProcessGroup | None = None
    ) -> Trainer:
        """A freshly seeded model for `dataset` and the `Trainer` that trains it into
        `run_dir`: the one assembly that `aet pretrain`, `AutoencoderEmbedder.fit` and the
        tests' small encoders use."""
        torch.manual_seed(self.seed)  # model initialisation, the same in every process
        model = build_autoencoder(self.model.for_data(dataset.is_vectors), dataset.image_shape)
        return Trainer(model, dataset, self.training, run_dir, self.to_dict(), group)

    def to_dict(self) -> dict:
        """The fields by flag name, as config.json and checkpoints record them."""
        return flat_dict(self)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig)


def prepare_run_dir(config: PretrainConfig) -> Path:
    """Create the run folder; refuse to overwrite a previous run unless resuming it."""
    run_dir = config.run_dir
    if config.resume and not (run_dir / "checkpoint.pt").exists():
        raise ConfigError(f"resume: no run to continue; expected {run_dir / 'checkpoint.pt'}")
    if (run_dir / "checkpoint.pt").exists() and not config.resume:
        raise ConfigError(
            f"name: run folder {run_dir} already holds a run; pass --resume to "
            f"continue it or choose another --name"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run folder {run_dir}: {exc}") from exc
    return run_dir


def write_json(path: Path, data: dict) -> None:
    try:
        path.write_text(json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc}") from exc


def write_figures(
    model: Autoencoder, dataset: Dataset, config: PretrainConfig, history: dict, run_dir: Path
) -> None:
    """loss_curve.png, reconstructions.png (clean, corrupted, reconstructed), latent_2d.png."""
    plot_loss_curves(history, run_dir / "loss_curve.png")
    plot_latent_2d(encode_array(model, dataset.test.x), dataset.test.y, run_dir / "latent_2d.png")
    if dataset.is_vectors:  # a grid of pictures needs images
        return
    clean = torch.from_numpy(dataset.test.x[:N_RECONSTRUCTIONS])
    corruption = config.training.corruption()
    corrupted = clean if corruption is None else corruption(clean)
    with torch.no_grad():
        reconstructed = model.eval().reconstruct(corrupted)
    plot_reconstructions(
        {
            "clean": clean.numpy(),
            "corrupted": corrupted.numpy(),
            "reconstructed": reconstructed.numpy(),
        },
        run_dir / "reconstructions.png",
    )


def config_of(args: argparse.Namespace) -> PretrainConfig:
    """Defaults, then the recipe (`--recipe`, or a `recipe` field of `--config`), the config
    file and the flags. `--probe-labels` with `--no-probes` is an error, not ignored."""
    if getattr(args, "probes", True) is False and hasattr(args, "probe_labels"):
        raise ConfigError(
            f"probe_labels: --probe-labels {' '.join(map(str, args.probe_labels))} was given "
            "with --no-probes, which skips the probes; drop one of the two"
        )
    recipe = getattr(args, "recipe", None)
    if recipe is None and getattr(args, "config", None) is not None:
        recipe = config_from_args(PretrainConfig, argparse.Namespace(config=args.config)).recipe
    preset = {} if recipe is None else {**load_recipe(recipe), "recipe": recipe}
    return config_from_args(PretrainConfig, args, preset)


def run(args: argparse.Namespace) -> int:
    """`aet pretrain`: the configuration of the flags, pretrained."""
    return pretrain(config_of(args))


def pretrain(config: PretrainConfig) -> int:
    """Train, evaluate and write the run folder; 130 after saving when interrupted, 75 when
    `stop_after_epochs` ended the call."""
    torch.set_num_threads(config.threads)
    dataset = config.load_dataset()
    require_classes(dataset, "the evaluation's probes")  # before training, not after it
    group = ProcessGroup.from_environment(config.training.device)  # several under torchrun
    try:
        return _train_and_report(config, dataset, group)
    finally:
        group.leave(together=False)  # after a failure; the normal ends left together already


def _train_and_report(config: PretrainConfig, dataset: Dataset, group: ProcessGroup) -> int:
    """Train in every process; rank 0 alone writes the run folder, evaluates and reports."""
    trainer = config.trainer(dataset, config.run_dir, group)  # a bad model: refused here
    run_dir = prepare_run_dir(config) if group.is_main else config.run_dir
    if config.resume:
        trainer.resume()  # checks the checkpoint holds this model before anything is written
    if group.is_main:
        write_json(run_dir / "config.json", config.to_dict())
        print(
            f"pretraining {config.model.architecture} on {dataset.name} {dataset.image_shape} "
            f"({len(dataset.train)} train / {len(dataset.val)} val / {len(dataset.test)} test) "
            f"on {trainer.device} ({group.world_size} process(es), {config.training.precision}) "
            f"into {run_dir}"
        )
    started = time.perf_counter()
    try:
        history = trainer.fit()
    except TrainingInterrupted as exc:
        group.leave()
        if group.is_main:
            print(f"{exc}; continue with --resume")
        if exc.slice_ended:  # rank 0 alone reports it: torchrun then exits 1 naming code 75
            return EXIT_SLICE_ENDED if group.is_main else 0
        return EXIT_INTERRUPTED
    train_seconds = time.perf_counter() - started
    group.leave()  # the last collective: rank 0 evaluates and writes alone after it
    if not group.is_main:
        return 0

    best = load_checkpoint(trainer.best_path)
    model = best.build_model()
    label_counts = (*config.probe_labels, None) if config.probes else ()
    evaluation = evaluate_autoencoder(model, dataset, label_counts, config.seed)
    print(format_evaluation(evaluation))
    best.metrics = {"stages": history, "evaluation": evaluation}
    save_checkpoint(trainer.best_path, best)
    # train_seconds: wall time of this invocation's training (after a resume, only its part)
    write_json(run_dir / "metrics.json", {**best.metrics, "train_seconds": train_seconds})
    write_figures(model, dataset, config, history, run_dir)
    print(f"run written to {run_dir}")
    return 0
