"""The training loop: Adam over a schedule of stages, early stopping, exact resume, Ctrl-C.

A schedule is one `train` stage, or for the stacked autoencoder one greedy stage per layer
(`layer-1` ... `layer-L`: layer k learns to reconstruct the clean code of layer k-1, earlier
layers frozen) followed by an end-to-end `fine-tune`. Denoising corrupts each stage's input in
training only; validation always compares against the clean target with a fixed corruption.

All randomness after model initialisation (shuffling, corruption, VAE sampling) comes from
seeded generators and samplers whose states go into `checkpoint.pt` with the model, the
optimizer and the position in the schedule, so `Trainer.resume()` continues exactly where a run
stopped, even mid-epoch after Ctrl-C. The per-step work outside forward/backward is kept to one
gather of the batch's rows (in a DataLoader, in worker processes if asked), the corruption draw
and an in-place loss sum; the loss is read back to the host only every `log_every` steps.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from aet.config import ConfigError
from aet.devices import DEVICES
from aet.training.augmentation import AugmentationConfig, build_augmentation
from aet.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from aet.training.corruption import CORRUPTION_KINDS, Corruption, build_corruption
from aet.training.data import Dataset
from aet.training.distributed import PRECISIONS, ProcessGroup, check_precision, resolve_device
from aet.training.models import Autoencoder, MLPAutoencoder

VALIDATION_BATCH = 1024


class TrainingInterrupted(Exception):
    """Ctrl-C (or the end of a `stop_after_epochs` slice) stopped training; the state at the
    last finished step is in `checkpoint_path`."""

    def __init__(self, checkpoint_path: Path, *, slice_ended: bool = False) -> None:
        why = "stopped after this run's stop_after_epochs" if slice_ended else "interrupted"
        super().__init__(f"{why}; state saved to {checkpoint_path}")
        self.checkpoint_path, self.slice_ended = checkpoint_path, slice_ended


@dataclass(frozen=True)
class TrainingConfig:
    """How to train (`aet pretrain`'s training flags): optimiser, schedule, early stopping,
    corruption, augmentation, device and logging.

    The defaults train the shipped digits encoder (a stacked denoising autoencoder).
    """

    epochs: int = field(
        default=200,
        metadata={"help": "maximum end-to-end epochs (the fine-tune stage of stacked)"},
    )
    layer_epochs: int = field(
        default=30, metadata={"help": "maximum epochs of each greedy layer stage (stacked)"}
    )
    batch_size: int = field(default=64, metadata={"help": "examples per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    patience: int = field(
        default=30,
        metadata={"help": "stop a stage after this many epochs without a better validation loss"},
    )
    noise: str = field(
        default="gaussian",
        metadata={"help": "input corruption during training", "choices": list(CORRUPTION_KINDS)},
    )
    noise_level: float = field(
        default=0.2,
        metadata={
            "help": "sigma for gaussian; corrupted fraction nu in [0, 1) "
            "for masking, salt-and-pepper"
        },
    )
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)  # images only
    # Seeds initialisation-independent randomness (noise, shuffling, sampling); `aet pretrain`
    # sets it to its data's seed, so it is not a flag of its own.
    seed: int = field(default=0, metadata={"flag": False})
    log_every: int = field(default=20, metadata={"help": "steps between progress-bar updates"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    device: str = field(
        default="auto",
        metadata={
            "help": "auto: CUDA when a GPU is usable (the server's rule), else CPU",
            "choices": list(DEVICES),
        },
    )
    precision: str = field(
        default="fp32",
        metadata={
            "help": "autocast dtype of forward passes: bf16 (CUDA or CPU), fp16 (CUDA, with "
            "gradient scaling)",
            "choices": list(PRECISIONS),
        },
    )
    loader_workers: int | None = field(
        default=None,
        metadata={"help": "DataLoader worker processes (default: 2 on CUDA, 0 on CPU)"},
    )
    stop_after_epochs: int | None = field(
        default=None,
        metadata={
            "help": "save and stop (exit 75) after this many epochs of this call, to be "
            "continued with --resume: training in time slices (default: run to the end)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer; got {getattr(self, name)}")
        if self.layer_epochs < 0:
            raise ConfigError(f"layer_epochs: expected >= 0; got {self.layer_epochs}")
        if self.stop_after_epochs is not None and self.stop_after_epochs < 1:
            raise ConfigError(
                f"stop_after_epochs: expected a positive integer; got {self.stop_after_epochs}"
            )
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ConfigError(f"loader_workers: expected >= 0; got {self.loader_workers}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(
                f"learning_rate: expected a positive number; got {self.learning_rate}"
            )
        build_corruption(self.noise, self.noise_level)  # validates kind and level

    def corruption(self, device: torch.device | str = "cpu", rank: int = 0) -> Corruption | None:
        """The noise of process `rank` (each process draws its own) on `device`."""
        return build_corruption(
            self.noise, self.noise_level, seed=self.seed + 1000 * rank, device=device
        )


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
    """Where training stands, plus the early-stopping record of the current stage.

    The order of an epoch's examples is a function of (seed, stage, epoch) (`DistributedSampler`),
    so `step` is all a resumed run needs to continue the epoch where it stopped.
    """

    stage: int = 0  # index into the schedule
    epoch: int = 0  # epochs completed in the stage
    step: int = 0  # steps completed in the current epoch
    loss_sum: torch.Tensor | None = None  # sum of this process's step losses in the epoch
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


class _Rows(torch.utils.data.Dataset):
    """Rows of an array or tensor, fetched a whole batch at a time (one gather per batch)."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        if torch.is_tensor(self.data):
            return self.data[torch.as_tensor(indices)]
        return torch.from_numpy(self.data[np.asarray(indices)])


def _whole_batch(batch: Any) -> torch.Tensor:
    """DataLoader collate for `_Rows`: the gathered batch is already one tensor."""
    return batch


class _EpochBatches:
    """A batch sampler whose batches are replaced every epoch (the loader and its workers stay)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _StageObjective(nn.Module):
    """The loss of one stage as a module, so DistributedDataParallel can wrap its forward."""

    def __init__(self, model: Autoencoder, stage: Stage) -> None:
        super().__init__()
        self.model, self.layer = model, stage.layer

    def forward(self, inputs, target, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.layer is None:
            return self.model.objective(inputs, target, generator)
        # The first layer's stage reads images: flatten them as stage_input(0, x) does.
        assert isinstance(self.model, MLPAutoencoder)  # greedy stages: stacked models only
        return self.model.stage_objective(self.layer, inputs.flatten(1), target.flatten(1))


@dataclass
class _StageRun:
    """What one stage trains with, built once per stage (`Trainer._stage_run`)."""

    stage: int  # index into the schedule
    rows: _Rows  # the stage's training rows
    batches: _EpochBatches  # this epoch's batches, which the loader serves
    loader: DataLoader
    val_data: torch.Tensor  # on the device
    objective: nn.Module  # the stage's loss, DDP-wrapped under torchrun


class Trainer:
    """Trains one model on one data set into `run_dir` (checkpoint.pt, best.pt).

    On the device `config.device` resolves to, with batches from a DataLoader (pinned memory and
    workers on CUDA) and, under torchrun (`group` of several processes), DistributedDataParallel
    over a DistributedSampler: each process takes `batch_size / world_size` rows of every
    global batch, and only rank 0 writes files.
    """

    def __init__(
        self,
        model: Autoencoder,
        dataset: Dataset,
        config: TrainingConfig,
        run_dir: Path,
        run_config: dict,
        group: ProcessGroup | None = None,
    ) -> None:
        self.group = ProcessGroup() if group is None else group
        self.device = resolve_device(config.device, self.group.local_rank)
        self.autocast_dtype = check_precision(config.precision, self.device)
        if config.batch_size % self.group.world_size:
            raise ConfigError(
                f"batch_size: expected a multiple of the {self.group.world_size} processes; "
                f"got {config.batch_size}"
            )
        self.model, self.dataset, self.config = model.to(self.device), dataset, config
        self.run_dir, self.run_config = Path(run_dir), run_config
        self.stages = plan_stages(model, config)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)  # VAE sampling
        self.corruption = config.corruption(self.device, self.group.rank)
        self.augmentation = build_augmentation(
            config.augmentation, seed=config.seed + 2 + 1000 * self.group.rank
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.position = Position()
        self._run: _StageRun | None = None
        self._interrupt = _InterruptFlag()
        self._epochs_this_call = 0  # toward stop_after_epochs
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
        stage, model = self._stage(), self.model
        if stage.layer is None:
            return torch.optim.Adam(model.parameters(), lr=self.config.learning_rate)
        assert isinstance(model, MLPAutoencoder)  # greedy stages: stacked models only
        params = model.stage_parameters(stage.layer)
        return torch.optim.Adam(params, lr=self.config.learning_rate)

    @torch.no_grad()
    def _stage_data(self, stage: Stage, x):
        """What the stage reconstructs: the images as stored (an array), or for a deeper greedy
        layer the clean codes of the frozen layers below (a tensor)."""
        if stage.layer is None or stage.layer == 0:
            return x
        model = self.model.eval()
        assert isinstance(model, MLPAutoencoder)  # greedy stages: stacked models only
        codes = [
            model.stage_input(
                stage.layer, torch.as_tensor(x[i : i + VALIDATION_BATCH]).to(self.device)
            ).cpu()
            for i in range(0, len(x), VALIDATION_BATCH)
        ]
        return torch.cat(codes)

    def _stage_run(self) -> _StageRun:
        """The stage's DataLoader, validation data and (DDP-wrapped) objective, once per stage."""
        if self._run is not None and self._run.stage == self.position.stage:
            return self._run
        stage = self._stage()
        on_cuda = self.device.type == "cuda"
        workers = self.config.loader_workers
        workers = (2 if on_cuda else 0) if workers is None else workers
        rows, batches = _Rows(self._stage_data(stage, self.dataset.train.x)), _EpochBatches()
        loader = DataLoader(
            rows,
            batch_sampler=batches,
            collate_fn=_whole_batch,
            num_workers=workers,
            pin_memory=on_cuda,
            persistent_workers=workers > 0,
        )
        val = torch.as_tensor(np.asarray(self._stage_data(stage, self.dataset.val.x)))
        val = val.to(self.device)
        objective: nn.Module = _StageObjective(self.model, stage)
        if self.group.distributed:
            objective = DistributedDataParallel(
                objective,
                device_ids=[self.device.index] if on_cuda else None,
                find_unused_parameters=stage.layer is not None,  # frozen layers get no gradient
            )
        self._run = _StageRun(self.position.stage, rows, batches, loader, val, objective)
        return self._run

    def _epoch_batches(self, rows: _Rows) -> list[list[int]]:
        """This process's batches of the current epoch (from its first step)."""
        pos, group = self.position, self.group
        sampler: DistributedSampler = DistributedSampler(
            rows,
            num_replicas=group.world_size,
            rank=group.rank,
            shuffle=True,
            seed=self.config.seed + pos.stage,
        )
        sampler.set_epoch(pos.epoch)
        order = list(sampler)
        size = self.config.batch_size // group.world_size
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes; nothing at all in fp32 (it costs per step)."""
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _validation_loss(self) -> float:
        """Mean loss of the current stage on the validation set, with the same corruption (and
        VAE samples) every epoch; rank 0's figure on every process."""
        val_data, stage = self._stage_run().val_data, self._stage()
        generator = torch.Generator(self.device).manual_seed(self.config.seed + 1)
        corruption = (
            None
            if self.corruption is None
            else Corruption(
                self.corruption.kind, self.corruption.level, self.config.seed + 1, self.device
            )
        )
        objective = _StageObjective(self.model, stage)
        self.model.eval()
        total = torch.zeros((), device=self.device)
        with torch.no_grad(), self._autocast():
            for start in range(0, len(val_data), VALIDATION_BATCH):
                target = val_data[start : start + VALIDATION_BATCH]
                inputs = target if corruption is None else corruption(target)
                total += objective(inputs, target, generator).float() * len(target)
        return self.group.from_main(total.item() / len(val_data))

    def _augmented(self, stage: Stage, target: torch.Tensor) -> torch.Tensor:
        """`target` augmented when the stage reads pixels (deeper greedy layers read codes)."""
        if self.augmentation is None or stage.layer not in (None, 0):
            return target
        images = target.view(-1, *self.dataset.image_shape)
        return self.augmentation(images).view(target.shape)

    def _target_and_input(
        self, stage: Stage, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a training step reconstructs, and what the model sees: augmented (the target
        too unless the augmentation is input-only) then corrupted."""
        rows = rows.to(self.device, non_blocking=True)
        augmented = self._augmented(stage, rows)
        target = rows if self.config.augmentation.augment_input_only else augmented
        inputs = augmented if self.corruption is None else self.corruption(augmented)
        return target, inputs

    def train_epoch(self) -> float:
        """Train one epoch of the current stage (the rest of it after a resume); its mean loss
        over all processes.

        Raises TrainingInterrupted after saving when a stop was requested mid-epoch (alone;
        under torchrun a stop waits for the end of the epoch, which all processes reach together).
        """
        run, stage, pos = self._stage_run(), self._stage(), self.position
        batches = self._epoch_batches(run.rows)
        n_steps = len(batches)
        if pos.loss_sum is None:
            pos.loss_sum = torch.zeros((), device=self.device)
        run.batches.batches = batches[pos.step :]
        self.model.train()
        bar = tqdm(
            total=n_steps,
            initial=pos.step,
            disable=not (self.config.progress and self.group.is_main),
            leave=False,
            desc=f"{stage.name} {pos.epoch + 1}/{stage.epochs}",
            unit="step",
        )
        with bar:
            for rows in run.loader:
                target, inputs = self._target_and_input(stage, rows)
                with self._autocast():
                    loss = run.objective(inputs, target, self.generator)
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler.is_enabled():  # fp16: scale the loss so gradients stay finite
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.optimizer.step()
                pos.loss_sum += loss.detach().float()
                pos.step += 1
                bar.update()
                if pos.step % self.config.log_every == 0:
                    bar.set_postfix(loss=f"{pos.loss_sum.item() / pos.step:.4f}")
                if self._interrupt.requested and pos.step < n_steps and not self.group.distributed:
                    self._stop()
        mean_loss = self.group.mean(pos.loss_sum).item() / n_steps
        pos.loss_sum, pos.step = None, 0
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
        if self.group.is_main:
            tqdm.write(
                f"{stage.name} epoch {pos.epoch}/{stage.epochs}: train {train_loss:.4f} "
                f"val {val_loss:.4f}{' *' if improved else ''}"
            )
        if improved and pos.stage == len(self.stages) - 1 and self.group.is_main:
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

    def _stop(self, *, slice_ended: bool = False) -> None:
        self.save()  # the caller's `ProcessGroup.leave` keeps every process until rank 0 wrote
        self._interrupt.requested = False  # this request is served; the trainer stays usable
        raise TrainingInterrupted(self.checkpoint_path, slice_ended=slice_ended)

    def _stop_requested(self) -> bool:
        """Whether any process was asked to stop (all of them then stop together)."""
        requested = torch.tensor(float(self._interrupt.requested))
        return bool(self.group.mean(requested).item() > 0)

    def _stage_done(self, stage: Stage) -> bool:
        pos = self.position
        return pos.epoch >= stage.epochs or pos.epochs_since_best >= self.config.patience

    def run_stage(self) -> None:
        """Train the current stage to its end (epochs or early stop), then move to the next.

        Raises TrainingInterrupted after saving when Ctrl-C arrives, or when this call has
        trained `stop_after_epochs` epochs.
        """
        with _catch_interrupt(self._interrupt):
            stage = self._stage()
            while not self._stage_done(stage):
                train_loss = self.train_epoch()
                self._end_epoch(stage, train_loss, self._validation_loss())
                self._epochs_this_call += 1
                if self._stop_requested():
                    self._stop()
                if self._epochs_this_call == self.config.stop_after_epochs:
                    self._stop(slice_ended=True)
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

    def _random_states(self) -> dict:
        """This process's generator states (shuffling needs none: the sampler is seeded)."""
        return {
            "generator": self.generator.get_state(),
            "corruption_generator": (
                None if self.corruption is None else self.corruption.generator.get_state()
            ),
            "augmentation_generator": (
                None if self.augmentation is None else self.augmentation.generator.get_state()
            ),
        }

    def _checkpoint(self, *, with_training_state: bool) -> Checkpoint:
        stage_name = "done" if self.finished else self._stage().name
        state = None
        if with_training_state:
            position = dataclasses.asdict(self.position)
            if self.position.loss_sum is not None:
                position["loss_sum"] = self.position.loss_sum.cpu()
            state = {
                **position,
                "optimizer": self.optimizer.state_dict(),
                "grad_scaler": self.scaler.state_dict(),
                "random_states": self.group.gather(self._random_states()),  # one per process
            }
        return Checkpoint(
            model_config=self.model.config,
            image_shape=self.dataset.image_shape,
            raw_max=self.dataset.raw_max,
            source=self.dataset.source,
            run_config=self.run_config,
            model_state={k: v.cpu() for k, v in self.model.state_dict().items()},
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
        """Write the resumable state to checkpoint.pt (rank 0; the others only take part)."""
        checkpoint = self._checkpoint(with_training_state=True)  # every process gathers
        if self.group.is_main:
            save_checkpoint(self.checkpoint_path, checkpoint)

    def resume(self) -> None:
        """Restore model, optimizer, history, RNG and position from checkpoint.pt.

        Raises CheckpointError when it is missing, unreadable, holds another model or was
        written by another number of processes.
        """
        checkpoint = load_checkpoint(self.checkpoint_path)
        checkpoint.require_model(self.model.config, self.dataset.image_shape, self.checkpoint_path)
        if checkpoint.training_state is None:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path}: holds no training state to resume from"
            )
        state = dict(checkpoint.training_state)
        random_states = state.pop("random_states")
        if len(random_states) != self.group.world_size:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path}: written by {len(random_states)} "
                f"process(es); resume with the same number (this run has {self.group.world_size})"
            )
        mine = random_states[self.group.rank]
        self.model.load_state_dict(checkpoint.model_state)
        self.history = checkpoint.metrics["stages"]
        self.generator.set_state(mine["generator"])
        if self.corruption is not None and mine["corruption_generator"] is not None:
            self.corruption.generator.set_state(mine["corruption_generator"])
        if self.augmentation is not None and mine["augmentation_generator"] is not None:
            self.augmentation.generator.set_state(mine["augmentation_generator"])
        optimizer_state = state.pop("optimizer")
        self.scaler.load_state_dict(state.pop("grad_scaler"))
        self.position = Position(**state)
        if self.position.loss_sum is not None:
            self.position.loss_sum = self.position.loss_sum.to(self.device)
        self._run = None
        if not self.finished:
            self.optimizer = self._make_optimizer()
            self.optimizer.load_state_dict(optimizer_state)
