"""Checkpoints: everything needed to rebuild a trained model, export it, or resume its training.

A checkpoint is a dict of plain values and tensors written with `torch.save` to a temporary
file and renamed into place, so a crash never leaves a half-written file, and read back with
`weights_only=True`, so opening one never runs code from it.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aet.config import ConfigError
from aet.errors import UserError
from aet.files import atomic_write
from aet.training.models import Autoencoder, ModelConfig, build_autoencoder

FORMAT = "aet-checkpoint/1"


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, of another format or of another model."""


@dataclass
class Checkpoint:
    """One saved model and, for the latest checkpoint of a run, the state to resume it.

    `training_state` (optimizer, RNG, position in the schedule, early stopping) is None in
    `best.pt`, which only holds the model to export.
    """

    model_config: ModelConfig
    image_shape: tuple[int, ...]  # one training row: (C, H, W) images or (D,) vectors
    raw_max: float  # raw pixel value that maps to 1.0
    source: dict  # the data set's origin and split (training.data.Dataset.source)
    run_config: dict  # the full `aet pretrain` configuration that produced the model
    model_state: dict[str, torch.Tensor]
    stage: str  # the schedule stage the model is in ("layer-1", ..., "fine-tune", "train")
    epoch: int  # epochs completed in that stage
    metrics: dict  # per-stage loss history and, once training ends, the evaluation
    training_state: dict[str, Any] | None = None
    # Vectors only: `FeatureStandardizer.to_dict()` fitted on the training split, and the
    # feature names (None for images, and in checkpoints written before vectors existed).
    standardizer: dict[str, Any] | None = None
    feature_names: list[str] | None = None

    def build_model(self) -> Autoencoder:
        """The autoencoder with the saved weights, in eval mode."""
        model = build_autoencoder(self.model_config, self.image_shape)
        model.load_state_dict(self.model_state)
        return model.eval()

    def require_model(self, config: ModelConfig, image_shape: tuple[int, ...], path: Path) -> None:
        """Raise CheckpointError unless it holds a model of `config` on `image_shape`."""
        if self.model_config != config:
            raise CheckpointError(
                f"checkpoint {path}: holds a different model; expected "
                f"{config.to_dict()}, got {self.model_config.to_dict()}"
            )
        if tuple(self.image_shape) != tuple(image_shape):
            raise CheckpointError(
                f"checkpoint {path}: trained on rows of shape {tuple(self.image_shape)}; "
                f"the data set has rows of shape {tuple(image_shape)}"
            )


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` to `path` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    payload = {
        **{f.name: getattr(checkpoint, f.name) for f in dataclasses.fields(Checkpoint)},
        "format": FORMAT,
        "model_config": checkpoint.model_config.to_dict(),
        "image_shape": list(checkpoint.image_shape),
    }
    # Serialised in memory first: a full disk then fails as OSError(ENOSPC) in `write`, not
    # as torch's "unexpected pos"; `atomic_write` fsyncs before the rename, so a crash leaves
    # the previous checkpoint, never an empty one.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        atomic_write(path, lambda temporary: temporary.write_bytes(buffer.getbuffer()))
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from exc


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; CheckpointError if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
    ) as exc:  # torch.load raises a bare OSError for some truncated files
        raise CheckpointError(f"checkpoint {path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path}: expected format {FORMAT!r}, got {found!r}")
    fields = {f.name for f in dataclasses.fields(Checkpoint)}
    optional = {"standardizer", "feature_names"}
    missing = sorted(fields - optional - payload.keys())
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing fields {', '.join(missing)}")
    values = {name: payload[name] for name in fields if name in payload}
    try:
        values["model_config"] = ModelConfig(**values["model_config"])
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint {path}: invalid model configuration ({exc})") from exc
    values["image_shape"] = tuple(int(d) for d in values["image_shape"])
    checkpoint = Checkpoint(**values)
    try:
        checkpoint.build_model()
    except (RuntimeError, ConfigError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit its model configuration ({exc})"
        ) from exc
    return checkpoint
