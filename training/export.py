"""`aet export`: a trained encoder -> ONNX, parity-checked, into the model repository.

The graph takes `pixels` float32 (batch, C, H, W) in the data set's raw range [0, raw_max]
(scaled, and for MLP encoders flattened, inside the graph), or `features` float32 (batch, D)
in their own units (standardised inside the graph with the training split's statistics). It
returns `embedding` float32 (batch, code_size) (a VAE exports its mean) and
`reconstruction_error` float32 (batch,), the novelty score: encoder and decoder run in the
graph and each row's reconstruction is scored in the model's likelihood terms, zero for a
perfect reconstruction, plus by default a density term of the code
(`training.novelty.NoveltyScore`). Callers that want only embeddings run the graph pruned to
its first output (`aet.runtime.embedding_graph`), which costs what an encoder alone costs.

Before anything is written the graph must pass `onnx.checker` and agree with PyTorch on
`PARITY_ROWS` inputs, run through onnxruntime in batches of 1 and odd sizes (embeddings to
within `PARITY_TOLERANCE`, scores to within the same relative tolerance). model.json then
records the score's percentiles on the validation split (`SCORE_PERCENTILES`), and the
validation rows' scores themselves go beside the graph (`CALIBRATION_FILE`, its sha256 in
model.json) for conformal p-values.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from aet.config import ConfigError, add_config_arguments, config_from_args, config_from_mapping
from aet.errors import UserError
from aet.repository import (
    CALIBRATION_FILE,
    CARD_FILE,
    MODEL_FILE,
    MODEL_NAME_PATTERN,
    SCORE_NAME,
    SCORE_PERCENTILES,
    InputSpec,
    ModelCard,
    OutputSpec,
    ScoreSpec,
    calibration_bytes,
    read_model_card,
    write_version,
)
from aet.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from aet.training.data import Dataset
from aet.training.models import Autoencoder
from aet.training.novelty import DEFAULT_NEIGHBOURS, DENSITY_LAYERS, NoveltyScore, ScoreSettings
from aet.training.pretrain import PretrainConfig
from aet.training.standardize import FeatureStandardizer

IMAGE_INPUT_NAME = "pixels"
VECTOR_INPUT_NAME = "features"
OUTPUT_NAME = "embedding"
SCORE_KINDS = ("reconstruction+density", "reconstruction")
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
    score: str = field(
        default=SCORE_KINDS[0],
        metadata={
            "help": "the novelty score in the graph: the reconstruction term plus the code's "
            "density term (images: its local outlier factor among the training codes; "
            "vectors: its Mahalanobis distance from them), or the reconstruction term alone",
            "choices": list(SCORE_KINDS),
        },
    )
    score_neighbours: int = field(
        default=DEFAULT_NEIGHBOURS,
        metadata={"help": "neighbours of the density term's local outlier factor (images)"},
    )
    score_layer: str = field(
        default="code",
        metadata={
            "help": "what the density term measures: the code, or the encoder's first hidden "
            "layer (fully connected encoders; for small images with a small code, "
            "docs/novelty.md)",
            "choices": list(DENSITY_LAYERS),
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
        if self.score_neighbours < 1:
            raise ConfigError(
                f"score_neighbours: expected a positive integer; got {self.score_neighbours}"
            )
        highest = onnx.defs.onnx_opset_version()
        if not 18 <= self.opset <= highest:
            raise ConfigError(
                f"opset: expected 18 (torch's ONNX exporter) to {highest} "
                f"(onnx {onnx.__version__}); got {self.opset}"
            )

    @property
    def checkpoint_path(self) -> Path:
        if self.checkpoint is not None:
            return self.checkpoint
        assert self.run is not None  # exactly one of the two (__post_init__)
        return self.run / "best.pt"

    @property
    def name(self) -> str:
        if self.model is not None:
            return self.model
        assert self.run is not None  # model is required with --checkpoint (__post_init__)
        return self.run.name


class Scale(torch.nn.Module):
    """Raw pixels in [0, raw_max] -> [0, 1]."""

    def __init__(self, raw_max: float):
        super().__init__()
        self.raw_max = float(raw_max)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels / self.raw_max


class StandardizeModule(torch.nn.Module):
    """`FeatureStandardizer`'s `(x - mean) / std` on (B, *feature_shape) tensors; the statistics
    are buffers, so they move with `.to(device)`, go into `state_dict` and become constants of
    an exported graph."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, standardizer: FeatureStandardizer) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(standardizer.mean.copy()))
        self.register_buffer("std", torch.from_numpy(standardizer.std.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ExportedEncoder(torch.nn.Module):
    """What the graph computes: raw rows -> preprocessing -> (embedding (B, code_size),
    reconstruction_error (B,)); with `with_score=False` the embedding alone."""

    def __init__(
        self,
        autoencoder: Autoencoder,
        preprocess: torch.nn.Module,
        with_score: bool = True,
        novelty: NoveltyScore | None = None,
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.preprocess = preprocess
        self.with_score = with_score
        # the score: `training.novelty` (default: its reconstruction term alone)
        self.novelty = (
            NoveltyScore.fit(autoencoder, np.zeros((0,)), ScoreSettings(density=False))
            if novelty is None
            else novelty
        )

    @property
    def output_names(self) -> list[str]:
        return [OUTPUT_NAME, SCORE_NAME] if self.with_score else [OUTPUT_NAME]

    def forward(self, raw: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(raw)
        if not self.with_score:
            return self.autoencoder.encode(x)
        return self.novelty(x)


def to_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    opset: int,
    input_name: str = IMAGE_INPUT_NAME,
    output_names: list[str] | None = None,
) -> onnx.ModelProto:
    """Export `module` with a dynamic batch axis and check the graph with `onnx.checker`;
    `output_names` default to the module's own (`ExportedEncoder.output_names`)."""
    if output_names is None:
        assert isinstance(module, ExportedEncoder), "other modules must name their outputs"
        output_names = module.output_names
    try:
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset,
            optimize=True,
            input_names=[input_name],
            output_names=output_names,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),  # by position: any arg name
        )
        if program is None:  # only without dynamo, which is always on here
            raise ExportError("torch.onnx.export returned no program")
        model = program.model_proto
        # The exporter annotates each node with Python stack traces and local file paths:
        # dropping them keeps the graph small and the bytes identical across machines.
        for node in model.graph.node:
            del node.metadata_props[:]
        onnx.checker.check_model(model, full_check=True)
    except (torch.onnx.errors.OnnxExporterError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"ONNX export of {type(module).__name__} failed: {exc}") from exc
    return model


def onnx_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the graph was written for."""
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def parity_rows(dataset: Dataset, rows: int = PARITY_ROWS, seed: int = 0) -> np.ndarray:
    """`rows` inputs in the graph's raw units: held-out rows first (test, val), then train rows.

    A data set smaller than `rows` is topped up with seeded noise: uniform in [0, raw_max] for
    images, standard normal in standardised units for vectors.
    """
    x = np.concatenate([dataset.test.x, dataset.val.x, dataset.train.x])[:rows]
    missing = rows - len(x)
    if missing > 0:
        rng = np.random.default_rng(seed)
        shape = (missing, *dataset.image_shape)
        noise = rng.standard_normal(shape) if dataset.is_vectors else rng.random(shape)
        x = np.concatenate([x, noise.astype(np.float32)])
    return dataset.raw(x)  # (rows, *row_shape)


def onnx_session(onnx_bytes: bytes) -> onnxruntime.InferenceSession:
    """A CPU session on the exported graph, or ExportError when onnxruntime cannot load it."""
    try:
        return onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf) as exc:
        raise ExportError(
            f"onnxruntime {onnxruntime.__version__} cannot load the exported graph: {exc}"
        ) from exc


def max_parity_diffs(
    session: onnxruntime.InferenceSession, encoder: ExportedEncoder, rows: np.ndarray
) -> dict[str, float]:
    """Max |onnxruntime - PyTorch| over `rows` of each output of `encoder`, the score's
    relative to max(1, |score|); onnxruntime is fed in `PARITY_BATCH_SIZES` chunks."""
    with torch.no_grad():
        expected = encoder(torch.from_numpy(rows))
    if not isinstance(expected, tuple):
        expected = (expected,)
    expected = [t.numpy() for t in expected]  # (N, code_size) and (N,)
    bad = np.zeros(len(rows), dtype=bool)
    for output in expected:
        bad |= ~np.isfinite(output.reshape(len(rows), -1)).all(axis=1)
    if bad.any():
        raise ExportError(
            f"the PyTorch encoder outputs NaN or Inf for {int(bad.sum())} of "
            f"{len(rows)} inputs; the checkpoint's weights are unusable"
        )
    input_name = session.get_inputs()[0].name
    diffs: dict[str, list[float]] = {name: [] for name in encoder.output_names}
    start = 0
    for size in itertools.cycle(PARITY_BATCH_SIZES):
        if start >= len(rows):
            break
        got = session.run(encoder.output_names, {input_name: rows[start : start + size]})
        for name, value, want in zip(encoder.output_names, got, expected, strict=True):
            want = want[start : start + size]
            if value.shape != want.shape:
                raise ExportError(
                    f"onnxruntime output {name!r}: expected shape {want.shape}, got {value.shape}"
                )
            scale = np.maximum(1.0, np.abs(want)) if name == SCORE_NAME else 1.0
            diffs[name].append(float((np.abs(value - want) / scale).max()))
        start += size
    # NaN if onnxruntime gave NaN: fails the tolerance check
    return {name: float(np.max(values)) for name, values in diffs.items()}


def graph_scores(session: onnxruntime.InferenceSession, rows: np.ndarray) -> np.ndarray:
    """The novelty score (N,) of `rows` (raw units), from the graph itself."""
    input_name = session.get_inputs()[0].name
    return np.concatenate(
        [
            session.run([SCORE_NAME], {input_name: rows[i : i + PARITY_BATCH_SIZES[-1]]})[0]
            for i in range(0, len(rows), PARITY_BATCH_SIZES[-1])
        ]
    )


def score_percentiles(scores: np.ndarray) -> dict[str, float]:
    """The novelty score's `SCORE_PERCENTILES` over `scores`."""
    levels = [float(name[1:]) for name in SCORE_PERCENTILES]
    return dict(zip(SCORE_PERCENTILES, map(float, np.percentile(scores, levels)), strict=True))


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that produced and checked the graph."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # onnxruntime ships as onnxruntime-gpu on Linux
            versions[name] = metadata.version(f"{name}-gpu")
    return versions


# How the encoder was trained, for model.json: the recipe and what made its inputs vary.
TRAINING_FIELDS = (
    "recipe",
    "noise",
    "noise_level",
    "augment_translate",
    "augment_rotate",
    "augment_scale",
    "augment_input_only",
    "epochs",
    "layer_epochs",
    "batch_size",
    "learning_rate",
    "seed",
)


def training_recipe(run_config: dict) -> dict:
    """The training fields of the run's `aet pretrain` configuration (absent ones: None)."""
    return {name: run_config.get(name) for name in TRAINING_FIELDS}


def card_metrics(metrics: dict) -> dict[str, float]:
    """The run's final numbers for model.json, from the checkpoint's evaluation (if any).

    Held-out reconstruction MSE (and PCA's at the same code size) and the fair probes'
    accuracies on the frozen codes for each label budget (`training.probes`): logistic
    regression (`probe_accuracy_*`) and k-NN (`knn_accuracy_*`).
    """
    evaluation = metrics.get("evaluation")
    if not evaluation:
        return {}
    mse = evaluation["reconstruction_mse"]
    result = {"test_reconstruction_mse": mse["model"], "test_pca_reconstruction_mse": mse["pca"]}
    probe = evaluation.get("probe")
    if probe:
        for kind, prefix in (("logreg", "probe"), ("knn", "knn")):
            for labels, accuracy in zip(
                probe["labels"], probe["accuracy"]["model"][kind], strict=True
            ):
                result[f"{prefix}_accuracy_{labels}_labels"] = accuracy
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
    return config.load_dataset()  # the same arguments `aet pretrain` passed: the same rows


def preprocessing_module(checkpoint: Checkpoint) -> torch.nn.Module:
    """The graph's first step: scale pixels, or standardise vectors with the checkpoint's
    training-split statistics."""
    if checkpoint.standardizer is not None:
        return StandardizeModule(
            FeatureStandardizer.from_dict(checkpoint.standardizer, "checkpoint")
        )
    return Scale(checkpoint.raw_max)


def preprocessing_steps(checkpoint: Checkpoint) -> list[str]:
    """What the graph does to its input before the encoder's first layer, for model.json."""
    if checkpoint.standardizer is not None:
        return [
            f"standardize: ({VECTOR_INPUT_NAME} - mean) / std per feature, statistics of the "
            f"training split (model.json 'standardizer')"
        ]
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
    vectors = checkpoint.standardizer is not None
    dataset = training_dataset(checkpoint, config.checkpoint_path)
    model = checkpoint.build_model().eval()
    settings = ScoreSettings(
        density=config.score == "reconstruction+density",
        neighbours=config.score_neighbours,
        layer=config.score_layer,
    )
    novelty = NoveltyScore.fit(model, np.asarray(dataset.train.x), settings, dataset.source["seed"])
    encoder = ExportedEncoder(model, preprocessing_module(checkpoint), novelty=novelty).eval()
    return export_encoder(
        encoder,
        parity_rows(dataset),
        dataset.raw(dataset.val.x),
        checkpoint,
        config.repository,
        config.name,
        opset=config.opset,
        input_name=VECTOR_INPUT_NAME if vectors else IMAGE_INPUT_NAME,
        value_range=None if vectors else (0.0, float(checkpoint.raw_max)),
        preprocessing=preprocessing_steps(checkpoint),
        feature_names=None if checkpoint.feature_names is None else tuple(checkpoint.feature_names),
        standardizer=checkpoint.standardizer,
    )


def export_encoder(
    encoder: ExportedEncoder,
    inputs: np.ndarray,
    calibration: np.ndarray,
    checkpoint: Checkpoint,
    repository: Path,
    name: str,
    *,
    opset: int,
    input_name: str,
    value_range: tuple[float, float] | None,
    preprocessing: list[str],
    feature_names: tuple[str, ...] | None = None,
    standardizer: dict | None = None,
) -> Path:
    """Export `encoder` (raw inputs (B, *row_shape) -> embedding (B, code_size) and score (B,))
    as the next version of `name`, after `onnx.checker` and the parity check on `inputs`
    (rows, *row_shape) float32; the score's percentiles are measured on `calibration`
    (held-out rows in the same raw units).

    `checkpoint` supplies the model's configuration, training data and metrics for model.json;
    `input_name`, `value_range` (None: any finite value), `preprocessing`, `feature_names` and
    `standardizer` describe what the graph takes and does to it.
    """
    if len(calibration) == 0:
        raise ExportError("score calibration: no validation rows; nothing written")
    model = to_onnx(encoder, torch.from_numpy(inputs[:2]), opset, input_name)
    onnx_bytes = model.SerializeToString()
    session = onnx_session(onnx_bytes)
    diffs = max_parity_diffs(session, encoder, inputs)
    diff, score_diff = diffs[OUTPUT_NAME], diffs[SCORE_NAME]
    if not (diff <= PARITY_TOLERANCE and score_diff <= PARITY_TOLERANCE):
        raise ExportError(
            f"parity check failed: over {len(inputs)} inputs, max |onnxruntime - PyTorch| of "
            f"{OUTPUT_NAME!r}: expected <= {PARITY_TOLERANCE:g}, got {diff:.3g}; of "
            f"{SCORE_NAME!r} relative to max(1, |score|): expected <= {PARITY_TOLERANCE:g}, "
            f"got {score_diff:.3g}; nothing written"
        )
    calibration_scores = graph_scores(session, calibration)
    measure = encoder.novelty.measure
    calibration_file = calibration_bytes(calibration_scores)
    card = ModelCard.draft(
        name,
        checkpoint.model_config.architecture,
        hyperparameters={
            **checkpoint.model_config.to_dict(),
            "training": training_recipe(checkpoint.run_config),
        },
        input=InputSpec(
            name=input_name,
            shape=tuple(int(d) for d in inputs.shape[1:]),
            dtype="float32",
            value_range=value_range,
            feature_names=feature_names,
        ),
        output=OutputSpec(
            name=OUTPUT_NAME, dtype="float32", embedding_dim=checkpoint.model_config.code_size
        ),
        preprocessing=preprocessing,
        dataset=checkpoint.source,
        metrics=card_metrics(checkpoint.metrics),
        opset=onnx_opset(model),
        parity_max_abs_diff=diff,
        parity_samples=len(inputs),
        library_versions=library_versions(),
        score=ScoreSpec(
            name=SCORE_NAME,
            dtype="float32",
            measure=measure,
            calibration_split="val",
            calibration_rows=len(calibration),
            percentiles=score_percentiles(calibration_scores),
            calibration_file=CALIBRATION_FILE,
            calibration_sha256=hashlib.sha256(calibration_file).hexdigest(),
        ),
        standardizer=standardizer,
    )
    return write_version(
        repository, name, onnx_bytes, card, extra_files={CALIBRATION_FILE: calibration_file}
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(ExportConfig, args)
    path = export(config)
    card = read_model_card(path / CARD_FILE)
    graph = onnx.load(path / MODEL_FILE)
    assert card.score is not None  # `export` always writes the score
    value_range = card.input.value_range
    units = (
        "standardised inside"
        if value_range is None
        else f"in [{value_range[0]:g}, {value_range[1]:g}]"
    )
    percentiles = ", ".join(f"{k} {v:.4g}" for k, v in card.score.percentiles.items())
    print(
        f"exported {config.checkpoint_path} -> {path}\n"
        f"  {card.input.name} {card.input.dtype} (batch, {', '.join(map(str, card.input.shape))}) "
        f"{units} -> "
        f"{card.output.name} {card.output.dtype} (batch, {card.output.embedding_dim}), "
        f"{card.score.name} (batch,)\n"
        f"  {card.score.name} on the {card.score.calibration_rows} validation rows: {percentiles}\n"
        f"  opset {card.opset}, {len(graph.graph.node)} nodes, "
        f"{(path / MODEL_FILE).stat().st_size / 1024:.1f} KiB, sha256 {card.sha256[:16]}...\n"
        f"  parity: max |onnxruntime - PyTorch| {card.parity_max_abs_diff:.2g} "
        f"over {card.parity_samples} inputs"
    )
    return 0
