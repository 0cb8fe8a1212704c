"""The training loop: Adam over a schedule of stages, early stopping, exact resume, Ctrl-C.

A schedule is one `train` stage, or for the stacked autoencoder one greedy stage per layer
(`layer-1` ... `layer-L`: layer k learns to reconstruct the clean code of layer k-1, earlier
layers frozen) followed by an end-to-end `fine-tune`. Denoising corrupts each stage's input in
training only; validation always compares against the clean target with a fixed corruption.

All randomness after model initialisation (shuffling, corruption, VAE sampling) comes from
seeded generators whose states go into `checkpoint.pt` with the model, the optimizer and the
position in the schedule, so `Trainer.resume()` continues exactly where a run stopped, even
mid-epoch after Ctrl-C. The per-step work outside forward/backward is kept to a slice of a
pre-shuffled tensor, the corruption draw and an in-place loss sum; the loss is read back to
the host only every `log_every` steps.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aet.config import ConfigError
from aet.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from aet.training.corruption import Corruption, build_corruption
from aet.training.data import Dataset
from aet.training.models import Autoencoder, MLPAutoencoder

VALIDATION_BATCH = 1024


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training; the state at the last finished step is in `checkpoint_path`."""

    def __init__(self, checkpoint_path: Path) -> None:
        super().__init__(f"interrupted; state saved to {checkpoint_path}")
        self.checkpoint_path = checkpoint_path


@dataclass(frozen=True)
class TrainingConfig:
    """How to train: optimiser, schedule, early stopping, corruption and logging.

    The defaults train the shipped digits encoder (a stacked denoising autoencoder).
    """

    epochs: int = 200  # end-to-end epochs (the fine-tune stage for stacked autoencoders)
    layer_epochs: int = 30  # epochs of each greedy layer stage (stacked only)
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 30  # stop a stage after this many epochs without a better validation loss
    noise: str = "gaussian"
    noise_level: float = 0.2  # sigma for gaussian, fraction nu for masking / salt-and-pepper
    seed: int = 0
    log_every: int = 20  # steps between progress-bar loss updates
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer; got {getattr(self, name)}")
        if self.layer_epochs < 0:
            raise ConfigError(f"layer_epochs: expected >= 0; got {self.layer_epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(
                f"learning_rate: expected a positive number; got {self.learning_rate}"
            )
        build_corruption(self.noise, self.noise_level)  # validates kind and level

    def corruption(self) -> Corruption | None:
        return build_corruption(self.noise, self.noise_level, seed=self.seed)


@dataclass(frozen=True)
class Stage:
    """One part of the schedule: a greedy layer (`layer` = its index) or end to end (None)."""

    name: str
    layer: int | None
    epochs: int


def plan_stages(model: Autoencoder, config: TrainingConfig) -> list[Stage]:
    """Greedy layer stages then `fine-tune` for stacked models; otherwise one `train` stage."""
    if model.config.architecture != "stacked":
        return [Stage("train", None, config.epochs)]
    assert isinstance(model, MLPAutoencoder)
    layers = [Stage(f"layer-{k + 1}", k, config.layer_epochs) for k in range(model.n_layers)]
    return [*layers, Stage("fine-tune", None, config.epochs)]


@dataclass
class Position:
    """Where training stands, plus the early-stopping record of the current stage."""

    stage: int = 0  # index into the schedule
    epoch: int = 0  # epochs completed in the stage
    step: int = 0  # steps completed in the current epoch
    permutation: torch.Tensor | None = None  # the current epoch's order, once it has started
    loss_sum: torch.Tensor | None = None  # sum of the current epoch's step losses
    best_val: float = math.inf
    epochs_since_best: int = 0
    best_model_state: dict | None = None


class _InterruptFlag:
    """Turns the first Ctrl-C into a flag the loop checks between steps; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def _catch_interrupt(flag: _InterruptFlag) -> Iterator[None]:
    """Route SIGINT to `flag` inside the block (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, flag)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """Trains one model on one data set into `run_dir` (checkpoint.pt, best.pt)."""

    def __init__(
        self,
        model: Autoencoder,
        dataset: Dataset,
        config: TrainingConfig,
        run_dir: Path,
        run_config: dict,
    ) -> None:
        self.model, self.dataset, self.config = model, dataset, config
        self.run_dir, self.run_config = Path(run_dir), run_config
        self.stages = plan_stages(model, config)
        self.train_x = torch.from_numpy(dataset.train.x)
        self.val_x = torch.from_numpy(dataset.val.x)
        self.generator = torch.Generator().manual_seed(config.seed)  # shuffling, VAE sampling
        self.corruption = config.corruption()
        self.position = Position()
        self._tensors_stage: int | None = None  # the stage whose inputs `_tensors` holds
        self._tensors: tuple[torch.Tensor, torch.Tensor] = (self.train_x, self.val_x)
        self._interrupt = _InterruptFlag()
        self.history: dict[str, dict] = {
            s.name: {"train_loss": [], "val_loss": []} for s in self.stages
        }
        self.optimizer = self._make_optimizer()

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def _stage(self) -> Stage:
        return self.stages[self.position.stage]

    @property
    def finished(self) -> bool:
        return self.position.stage >= len(self.stages)

    def _make_optimizer(self) -> torch.optim.Adam:
        stage = self._stage()
        params = (
            self.model.parameters()
            if stage.layer is None
            else self.model.stage_parameters(stage.layer)
        )
        return torch.optim.Adam(params, lr=self.config.learning_rate)

    def _stage_data(self, stage: Stage, x: torch.Tensor) -> torch.Tensor:
        """What the stage reconstructs: pixels, or layer k's clean input code (frozen layers)."""
        if stage.layer is None:
            return x
        with torch.no_grad():
            return self.model.stage_input(stage.layer, x)

    def _stage_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, validation) data of the current stage, computed once per stage."""
        if self._tensors_stage != self.position.stage:
            stage = self._stage()
            self._tensors = (
                self._stage_data(stage, self.train_x),
                self._stage_data(stage, self.val_x),
            )
            self._tensors_stage = self.position.stage
        return self._tensors

    def _loss_function(self, stage: Stage) -> Callable[..., torch.Tensor]:
        if stage.layer is None:
            return lambda inputs, target: self.model.objective(inputs, target, self.generator)
        return lambda inputs, target: self.model.stage_objective(stage.layer, inputs, target)

    def _validation_loss(self) -> float:
        """Mean loss of the current stage on the validation set, with the same corruption (and
        VAE samples) every epoch."""
        _, val_data = self._stage_tensors()
        loss_of = self._loss_function(self._stage())
        saved = self.generator.get_state()
        self.generator.manual_seed(self.config.seed + 1)
        corruption = (
            None
            if self.corruption is None
            else Corruption(self.corruption.kind, self.corruption.level, self.config.seed + 1)
        )
        self.model.eval()
        total = torch.zeros(())
        with torch.no_grad():
            for start in range(0, len(val_data), VALIDATION_BATCH):
                target = val_data[start : start + VALIDATION_BATCH]
                inputs = target if corruption is None else corruption(target)
                total += loss_of(inputs, target) * len(target)
        self.generator.set_state(saved)
        return total.item() / len(val_data)

    def train_epoch(self) -> float:
        """Train one epoch of the current stage (the rest of it after a resume); its mean loss.

        Raises TrainingInterrupted after saving when a stop was requested mid-epoch.
        """
        stage, (train_data, _) = self._stage(), self._stage_tensors()
        pos, batch = self.position, self.config.batch_size
        if pos.permutation is None:
            pos.permutation = torch.randperm(len(train_data), generator=self.generator)
            pos.loss_sum = torch.zeros(())
        shuffled = train_data[pos.permutation]  # one gather per epoch; steps slice views of it
        n_steps = math.ceil(len(train_data) / batch)
        loss_of = self._loss_function(stage)
        self.model.train()
        bar = tqdm(
            total=n_steps,
            initial=pos.step,
            disable=not self.config.progress,
            leave=False,
            desc=f"{stage.name} {pos.epoch + 1}/{stage.epochs}",
            unit="step",
        )
        with bar:
            while pos.step < n_steps:
                target = shuffled[pos.step * batch : (pos.step + 1) * batch]
                inputs = target if self.corruption is None else self.corruption(target)
                loss = loss_of(inputs, target)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                pos.loss_sum += loss.detach()
                pos.step += 1
                bar.update()
                if pos.step % self.config.log_every == 0:
                    bar.set_postfix(loss=f"{pos.loss_sum.item() / pos.step:.4f}")
                if self._interrupt.requested and pos.step < n_steps:
                    self._stop()
        mean_loss = pos.loss_sum.item() / n_steps
        pos.permutation, pos.loss_sum, pos.step = None, None, 0
        return mean_loss

    def _end_epoch(self, stage: Stage, train_loss: float, val_loss: float) -> None:
        """Record the epoch's losses and keep the best weights so far."""
        pos = self.position
        pos.epoch += 1
        record = self.history[stage.name]
        record["train_loss"].append(train_loss)
        record["val_loss"].append(val_loss)
        improved = val_loss < pos.best_val
        if improved:
            pos.best_val, pos.epochs_since_best = val_loss, 0
            pos.best_model_state = copy.deepcopy(self.model.state_dict())
            record["best_epoch"] = pos.epoch
        else:
            pos.epochs_since_best += 1
        record["stopped_early"] = (
            pos.epochs_since_best >= self.config.patience and pos.epoch < stage.epochs
        )
        tqdm.write(
            f"{stage.name} epoch {pos.epoch}/{stage.epochs}: train {train_loss:.4f} "
            f"val {val_loss:.4f}{' *' if improved else ''}"
        )
        if improved and pos.stage == len(self.stages) - 1:
            save_checkpoint(self.best_path, self._checkpoint(with_training_state=False))

    def _next_stage(self) -> None:
        """Keep the stage's best weights and move on with a fresh optimizer and record."""
        pos = self.position
        if pos.best_model_state is not None:
            self.model.load_state_dict(pos.best_model_state)
        self.position = Position(stage=pos.stage + 1)
        if not self.finished:
            self.optimizer = self._make_optimizer()

    def request_stop(self) -> None:
        """Ask training to save and stop after the current step, as Ctrl-C does."""
        self._interrupt.requested = True

    def _stop(self) -> None:
        self.save()
        self._interrupt.requested = False  # this request is served; the trainer stays usable
        raise TrainingInterrupted(self.checkpoint_path)

    def _stage_done(self, stage: Stage) -> bool:
        pos = self.position
        return pos.epoch >= stage.epochs or pos.epochs_since_best >= self.config.patience

    def run_stage(self) -> None:
        """Train the current stage to its end (epochs or early stop), then move to the next.

        Raises TrainingInterrupted after saving when Ctrl-C arrives.
        """
        with _catch_interrupt(self._interrupt):
            stage = self._stage()
            while not self._stage_done(stage):
                train_loss = self.train_epoch()
                self._end_epoch(stage, train_loss, self._validation_loss())
                if self._interrupt.requested:
                    self._stop()
                self.save()
            self._next_stage()
            self.save()

    def fit(self) -> dict:
        """Run (or finish) the whole schedule; returns the per-stage loss history.

        Raises TrainingInterrupted after saving when Ctrl-C arrives.
        """
        with _catch_interrupt(self._interrupt):
            while not self.finished:
                self.run_stage()
        return self.history

    def _checkpoint(self, *, with_training_state: bool) -> Checkpoint:
        stage_name = "done" if self.finished else self._stage().name
        state = None
        if with_training_state:
            state = {
                **dataclasses.asdict(self.position),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "corruption_generator": (
                    None if self.corruption is None else self.corruption.generator.get_state()
                ),
            }
        return Checkpoint(
            model_config=self.model.config,
            image_shape=self.dataset.image_shape,
            raw_max=self.dataset.raw_max,
            source=self.dataset.source,
            run_config=self.run_config,
            model_state=self.model.state_dict(),
            stage=stage_name,
            epoch=self.position.epoch,
            metrics={"stages": self.history},
            training_state=state,
            standardizer=(
                None if self.dataset.standardizer is None else self.dataset.standardizer.to_dict()
            ),
            feature_names=(
                None if self.dataset.feature_names is None else list(self.dataset.feature_names)
            ),
        )

    def save(self) -> None:
        """Write the resumable state to checkpoint.pt."""
        save_checkpoint(self.checkpoint_path, self._checkpoint(with_training_state=True))

    def resume(self) -> None:
        """Restore model, optimizer, history, RNG and position from checkpoint.pt.

        Raises CheckpointError when it is missing, unreadable or holds another model.
        """
        checkpoint = load_checkpoint(self.checkpoint_path)
        checkpoint.require_model(self.model.config, self.dataset.image_shape, self.checkpoint_path)
        if checkpoint.training_state is None:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path}: holds no training state to resume from"
            )
        state = dict(checkpoint.training_state)
        self.model.load_state_dict(checkpoint.model_state)
        self.history = checkpoint.metrics["stages"]
        self.generator.set_state(state.pop("generator"))
        corruption_state = state.pop("corruption_generator")
        if self.corruption is not None and corruption_state is not None:
            self.corruption.generator.set_state(corruption_state)
        optimizer_state = state.pop("optimizer")
        self.position = Position(**state)
        self._tensors_stage = None
        if not self.finished:
            self.optimizer = self._make_optimizer()
            self.optimizer.load_state_dict(optimizer_state)
