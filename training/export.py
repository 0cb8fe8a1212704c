"""`aet export`: a trained encoder -> ONNX, parity-checked, into the model repository.

The graph takes `pixels` float32 (batch, C, H, W) in the data set's raw range [0, raw_max],
scales (and, for MLP encoders, flattens) inside the graph, and returns `embedding` float32
(batch, code_size); a VAE exports its mean. Before anything is written the graph must pass
`onnx.checker` and agree with PyTorch to within `PARITY_TOLERANCE` on `PARITY_ROWS` inputs,
run through onnxruntime in batches of 1 and odd sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from aet.config import ConfigError, add_config_arguments, config_from_args, config_from_mapping
from aet.errors import UserError
from aet.server.repository import (
    CARD_FILE,
    MODEL_FILE,
    MODEL_NAME_PATTERN,
    InputSpec,
    ModelCard,
    OutputSpec,
    next_version,
    read_model_card,
    write_version,
)
from aet.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from aet.training.data import Dataset, load_dataset
from aet.training.pretrain import PretrainConfig

INPUT_NAME = "pixels"
OUTPUT_NAME = "embedding"
PARITY_ROWS = 1000
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 3, 17, 255)  # cycled over the parity rows: batch 1 and odd sizes
DEFAULT_OPSET = 20
LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime", "numpy")


class ExportError(UserError):
    """The encoder could not be exported, or the exported graph failed its checks."""


@dataclass
class ExportConfig:
    """What `aet export` exports (a run's best.pt or a checkpoint file) and where to."""

    run: Path | None = field(
        default=None, metadata={"help": "run folder written by `aet pretrain`; exports its best.pt"}
    )
    checkpoint: Path | None = field(
        default=None, metadata={"help": "checkpoint file to export (instead of --run)"}
    )
    repository: Path = field(default=Path("exported"), metadata={"help": "model repository root"})
    model: str | None = field(
        default=None,
        metadata={"help": "model folder name in the repository; the run folder's name if omitted"},
    )
    opset: int = field(
        default=DEFAULT_OPSET,
        metadata={
            "help": "ONNX opset: 18 (the exporter's lowest) up to what the installed onnx knows"
        },
    )

    def __post_init__(self):
        if (self.run is None) == (self.checkpoint is None):
            raise ConfigError(
                "run / checkpoint: give exactly one of --run or --checkpoint; "
                f"got run={self.run}, checkpoint={self.checkpoint}"
            )
        if self.model is None and self.run is None:
            raise ConfigError("model: required with --checkpoint (no run folder to name it)")
        if self.model is not None and not MODEL_NAME_PATTERN.fullmatch(self.model):
            raise ConfigError(f"model: expected {MODEL_NAME_PATTERN.pattern}; got {self.model!r}")
        highest = onnx.defs.onnx_opset_version()
        if not 18 <= self.opset <= highest:
            raise ConfigError(
                f"opset: expected 18 (torch's ONNX exporter) to {highest} "
                f"(onnx {onnx.__version__}); got {self.opset}"
            )

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint if self.checkpoint is not None else self.run / "best.pt"

    @property
    def name(self) -> str:
        return self.model if self.model is not None else self.run.name


class PixelEncoder(torch.nn.Module):
    """What the graph computes: raw pixels (B, C, H, W) in [0, raw_max] -> (B, code_size)."""

    def __init__(self, autoencoder: torch.nn.Module, raw_max: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.raw_max = float(raw_max)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(pixels / self.raw_max)


def to_onnx(encoder: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """Export `encoder` with a dynamic batch axis and check the graph with `onnx.checker`."""
    try:
        program = torch.onnx.export(
            encoder,
            (example,),
            dynamo=True,
            opset_version=opset,
            optimize=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),  # by position: any arg name
        )
        model = program.model_proto
        # The exporter annotates each node with Python stack traces and local file paths:
        # dropping them keeps the graph small and the bytes identical across machines.
        for node in model.graph.node:
            del node.metadata_props[:]
        onnx.checker.check_model(model, full_check=True)
    except (torch.onnx.errors.OnnxExporterError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"ONNX export of the encoder failed: {exc}") from exc
    return model


def onnx_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the graph was written for."""
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def parity_pixels(dataset: Dataset, rows: int = PARITY_ROWS, seed: int = 0) -> np.ndarray:
    """`rows` raw-range inputs: held-out rows first (test, val), then train rows.

    A data set smaller than `rows` is topped up with seeded uniform noise in [0, raw_max].
    """
    images = np.concatenate([dataset.test.x, dataset.val.x, dataset.train.x])[:rows]
    missing = rows - len(images)
    if missing > 0:
        noise = np.random.default_rng(seed).random((missing, *dataset.image_shape))
        images = np.concatenate([images, noise.astype(np.float32)])
    return (images * np.float32(dataset.raw_max)).astype(np.float32)  # (rows, C, H, W)


def max_parity_diff(onnx_bytes: bytes, encoder: torch.nn.Module, pixels: np.ndarray) -> float:
    """Max |onnxruntime - PyTorch| over `pixels`, onnxruntime fed in `PARITY_BATCH_SIZES` chunks."""
    try:
        session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf) as exc:
        raise ExportError(
            f"onnxruntime {onnxruntime.__version__} cannot load the exported graph: {exc}"
        ) from exc
    with torch.no_grad():
        expected = encoder(torch.from_numpy(pixels)).numpy()  # (N, code_size)
    bad_rows = int((~np.isfinite(expected)).any(axis=1).sum())
    if bad_rows:
        raise ExportError(
            f"the PyTorch encoder outputs NaN or Inf for {bad_rows} of "
            f"{len(pixels)} inputs; the checkpoint's weights are unusable"
        )
    diffs, start = [], 0
    for size in itertools.cycle(PARITY_BATCH_SIZES):
        if start >= len(pixels):
            break
        want = expected[start : start + size]
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels[start : start + size]})
        if got.shape != want.shape:
            raise ExportError(
                f"onnxruntime output {OUTPUT_NAME!r}: expected shape {want.shape}, got {got.shape}"
            )
        diffs.append(np.abs(got - want).max())
        start += size
    return float(np.max(diffs))  # NaN if onnxruntime gave NaN: fails the tolerance check


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that produced and checked the graph."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # onnxruntime ships as onnxruntime-gpu on Linux
            versions[name] = metadata.version(f"{name}-gpu")
    return versions


def card_metrics(metrics: dict) -> dict[str, float]:
    """The run's final numbers for model.json, from the checkpoint's evaluation (if any).

    Held-out reconstruction MSE (and PCA's at the same code size) and the linear-probe
    accuracy on the frozen codes for each label budget.
    """
    evaluation = metrics.get("evaluation")
    if not evaluation:
        return {}
    mse = evaluation["reconstruction_mse"]
    result = {"test_reconstruction_mse": mse["model"], "test_pca_reconstruction_mse": mse["pca"]}
    probe = evaluation.get("probe")
    if probe:
        for labels, accuracy in zip(probe["labels"], probe["model"], strict=True):
            result[f"probe_accuracy_{labels}_labels"] = accuracy
    return {key: float(value) for key, value in result.items()}


def training_dataset(checkpoint: Checkpoint, path: Path) -> Dataset:
    """The data set `checkpoint` (read from `path`) was trained on, split as in training."""
    try:
        config = config_from_mapping(PretrainConfig, checkpoint.run_config)
    except ConfigError as exc:
        raise CheckpointError(
            f"checkpoint {path}: its pretrain configuration is not valid for "
            f"this version of aet ({exc})"
        ) from exc
    # The same arguments `aet pretrain` passes, so the held-out rows are the same rows.
    return load_dataset(
        config.dataset,
        config.data_path,
        seed=config.seed,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        image_size=config.image_size,
        limit=config.limit,
    )


def preprocessing_steps(checkpoint: Checkpoint) -> list[str]:
    """What the graph does to `pixels` before the encoder's first layer, for model.json."""
    channels, height, width = checkpoint.image_shape
    steps = [f"scale: pixels / {checkpoint.raw_max:g} -> [0, 1]"]
    if checkpoint.model_config.architecture != "conv":
        steps.append(f"flatten: ({channels}, {height}, {width}) -> {channels * height * width}")
    return steps


def export(config: ExportConfig) -> Path:
    """Export the checkpoint `config` names as the next version of its model.

    Nothing is written unless the graph passes `onnx.checker` and the parity check.
    Returns the new version folder.
    """
    checkpoint = load_checkpoint(config.checkpoint_path)  # CheckpointError names the fault
    encoder = PixelEncoder(checkpoint.build_model(), checkpoint.raw_max).eval()
    pixels = parity_pixels(training_dataset(checkpoint, config.checkpoint_path))  # (rows, C, H, W)
    return export_encoder(
        encoder,
        pixels,
        checkpoint,
        config.repository,
        config.name,
        opset=config.opset,
        value_range=(0.0, float(checkpoint.raw_max)),
        preprocessing=preprocessing_steps(checkpoint),
    )


def export_encoder(
    encoder: torch.nn.Module,
    inputs: np.ndarray,
    checkpoint: Checkpoint,
    repository: Path,
    name: str,
    *,
    opset: int,
    value_range: tuple[float, float],
    preprocessing: list[str],
) -> Path:
    """Export `encoder` (raw inputs (B, *row_shape) -> (B, code_size)) as the next version of
    `name`, after `onnx.checker` and the parity check on `inputs` (rows, *row_shape) float32.

    `checkpoint` supplies the model's configuration, training data and metrics for model.json;
    `value_range` and `preprocessing` describe what the graph takes and does to it.
    """
    model = to_onnx(encoder, torch.from_numpy(inputs[:2]), opset)
    onnx_bytes = model.SerializeToString()
    diff = max_parity_diff(onnx_bytes, encoder, inputs)
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(
            f"parity check failed: max |onnxruntime - PyTorch| over {len(inputs)} "
            f"inputs: expected <= {PARITY_TOLERANCE:g}, got {diff:.3g}; "
            f"nothing written"
        )
    card = ModelCard(
        name=name,
        version=next_version(repository, name),
        architecture=checkpoint.model_config.architecture,
        hyperparameters=checkpoint.model_config.to_dict(),
        input=InputSpec(
            name=INPUT_NAME,
            shape=tuple(int(d) for d in inputs.shape[1:]),
            dtype="float32",
            value_range=value_range,
        ),
        output=OutputSpec(
            name=OUTPUT_NAME, dtype="float32", embedding_dim=checkpoint.model_config.code_size
        ),
        preprocessing=preprocessing,
        dataset=checkpoint.source,
        metrics=card_metrics(checkpoint.metrics),
        opset=onnx_opset(model),
        sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        parity_max_abs_diff=diff,
        parity_samples=len(inputs),
        library_versions=library_versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return write_version(repository, name, onnx_bytes, card)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(ExportConfig, args)
    path = export(config)
    card = read_model_card(path / CARD_FILE)
    graph = onnx.load(path / MODEL_FILE)
    print(
        f"exported {config.checkpoint_path} -> {path}\n"
        f"  {card.input.name} {card.input.dtype} (batch, {', '.join(map(str, card.input.shape))}) "
        f"in [{card.input.value_range[0]:g}, {card.input.value_range[1]:g}] -> "
        f"{card.output.name} {card.output.dtype} (batch, {card.output.embedding_dim})\n"
        f"  opset {card.opset}, {len(graph.graph.node)} nodes, "
        f"{(path / MODEL_FILE).stat().st_size / 1024:.1f} KiB, sha256 {card.sha256[:16]}...\n"
        f"  parity: max |onnxruntime - PyTorch| {card.parity_max_abs_diff:.2g} "
        f"over {card.parity_samples} inputs"
    )
    return 0
