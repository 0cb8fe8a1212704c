"""Classifiers on frozen features, and the encoder fine-tuned under one: the learning code of
`aet probe` (the MLP head beside the fair probes of `training.probes`, and `--fine-tune`) and of
`aet head`, which turns a fitted head into a torch module (`ProbabilityHead`: standardise,
layers, softmax) that `training.export.to_onnx` writes, as it writes the encoders, and joins it
behind the encoder's graph (`classifier_graph`), checked for parity before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import compose, version_converter
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from aet.errors import UserError
from aet.repository import ModelCard
from aet.runtime import embedding_graph
from aet.training.checkpoint import load_checkpoint
from aet.training.data import Dataset, require_classes
from aet.training.export import (
    ExportedEncoder,
    onnx_opset,
    onnx_session,
    preprocessing_module,
    to_onnx,
)
from aet.training.mapped import Images
from aet.training.models import Autoencoder
from aet.training.probes import ProbeScore, tune_logistic


class HeadError(UserError):
    """The head cannot be fitted or exported: no labels, a changed encoder, a name clash."""


def labels_of(dataset: Dataset) -> tuple[np.ndarray, np.ndarray, int]:
    """Labels of the fit and test rows, and the number of classes; HeadError without labels."""
    fit_y, test_y, num_classes = dataset.fit.y, dataset.test.y, dataset.num_classes
    if fit_y is None or test_y is None or num_classes is None:
        raise HeadError(f"data set {dataset.name}: has no labels; a classifier needs them")
    require_classes(dataset, "a classifier")
    return fit_y, test_y, num_classes


def _batches(n_rows: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` seeded mini-batches of row indices (128, or all rows when fewer)."""
    generator = torch.Generator().manual_seed(seed)
    size = min(128, n_rows)
    return [torch.randperm(n_rows, generator=generator)[:size] for _ in range(steps)]


def _train(
    module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int, seed: int
) -> None:
    """Adam (lr 1e-3, weight decay 1e-4) on cross-entropy over seeded mini-batches."""
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=1e-4)
    module.train()
    for index in _batches(len(inputs), steps, seed):
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(inputs[index]), targets[index]).backward()
        optimizer.step()
    module.eval()


@dataclass
class MLPHead:
    """A fitted one-hidden-layer MLP on standardised frozen features."""

    scaler: StandardScaler
    network: nn.Sequential  # Linear -> ReLU -> Dropout -> Linear: logits (N, classes)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, classes) of features `x` (N, D), in eval mode."""
        self.network.eval()
        with torch.no_grad():
            return self.network(
                torch.from_numpy(self.scaler.transform(x).astype(np.float32))
            ).numpy()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, classes) of features `x` (N, D)."""
        return torch.softmax(torch.from_numpy(self.logits(x)), dim=1).numpy()


def fit_mlp_head(
    train_x: np.ndarray, train_y: np.ndarray, num_classes: int, hidden: int, steps: int, seed: int
) -> MLPHead:
    """A one-hidden-layer MLP head trained on standardised frozen features (N, D)."""
    torch.manual_seed(seed)
    scaler = StandardScaler().fit(train_x)
    network = nn.Sequential(
        nn.Linear(train_x.shape[1], hidden),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(hidden, num_classes),
    )
    inputs = torch.from_numpy(scaler.transform(train_x).astype(np.float32))
    _train(network, inputs, torch.from_numpy(train_y), steps, seed)
    return MLPHead(scaler, network)


def mlp_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int,
    *,
    num_classes: int,
    hidden: int,
    steps: int,
) -> ProbeScore:
    """Test accuracy of a one-hidden-layer MLP head on standardised frozen features."""
    head = fit_mlp_head(train_x, train_y, num_classes, hidden, steps, seed)
    accuracy = float((head.logits(test_x).argmax(1) == test_y).mean())
    return ProbeScore(accuracy, {"hidden": hidden, "steps": steps}, None, 0)


class EncoderClassifier(nn.Module):
    """The autoencoder's encoder under a linear head; the head's BatchNorm (no learned scale)
    standardises codes of any scale, as the frozen probes' StandardScaler does."""

    def __init__(self, encoder: Autoencoder, code_size: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(
            nn.BatchNorm1d(code_size, affine=False), nn.Linear(code_size, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of images `x` (B, C, H, W) in [0, 1]."""
        return self.head(self.encoder.encode(x))


def fine_tune(
    run: Path, dataset: Dataset, index: np.ndarray, steps: int, seed: int
) -> EncoderClassifier:
    """The run's encoder plus a linear head, all trained on rows `index` of the fit split."""
    from aet.training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(run / "best.pt")
    if tuple(checkpoint.image_shape) != dataset.image_shape:
        raise HeadError(
            f"fine_tune: {run / 'best.pt'} was trained on images "
            f"{tuple(checkpoint.image_shape)}; data set {dataset.name} has "
            f"{dataset.image_shape}"
        )
    fit = dataset.fit
    if fit.y is None or dataset.num_classes is None:
        raise HeadError(f"data set {dataset.name}: has no labels; nothing to fine-tune on")
    torch.manual_seed(seed)
    autoencoder = checkpoint.build_model()
    model = EncoderClassifier(autoencoder, autoencoder.code_size, dataset.num_classes)
    _train(model, torch.from_numpy(fit.x[index]), torch.from_numpy(fit.y[index]), steps, seed)
    return model


@torch.no_grad()
def classifier_logits(model: nn.Module, x: Images) -> np.ndarray:
    """Logits (N, classes) of images `x` (N, C, H, W) in [0, 1], in blocks of 1,024."""
    model.eval()
    return torch.cat(
        [model(torch.from_numpy(x[i : i + 1024])) for i in range(0, len(x), 1024)]
    ).numpy()


def fine_tune_probe(run: Path, dataset: Dataset, index: np.ndarray, steps: int, seed: int) -> float:
    """Test accuracy of the run's encoder plus a linear head, all trained on rows `index`."""
    model = fine_tune(run, dataset, index, steps, seed)
    predictions = classifier_logits(model, dataset.test.x).argmax(1)
    return float((predictions == dataset.test.y).mean())


# --- the probe run ---------------------------------------------------------------------------


class ProbabilityHead(nn.Module):
    """embedding (B, D) -> standardise -> `network` -> softmax: probabilities (B, classes)."""

    mean: torch.Tensor  # (D,) buffers, exported as graph constants
    scale: torch.Tensor

    def __init__(self, mean: np.ndarray, scale: np.ndarray, network: nn.Module):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.network = network

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network((embedding - self.mean) / self.scale), dim=1)


class RawClassifier(nn.Module):
    """A fine-tuned `EncoderClassifier` on raw rows (the encoder graph's input): the run's
    preprocessing (scale pixels, or standardise vectors), then probabilities (B, classes)."""

    def __init__(self, classifier: nn.Module, preprocess: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.preprocess = preprocess

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(self.preprocess(raw)), dim=1)


def _standardisation(scaler: StandardScaler | None, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if scaler is None:
        return np.zeros(dim), np.ones(dim)
    return scaler.mean_, scaler.scale_


def logistic_module(pipeline: Pipeline) -> ProbabilityHead:
    """The fitted `scale -> LogisticRegression` pipeline as a `ProbabilityHead`.

    Multinomial: softmax(x W^T + b). Binary: scikit-learn's sigmoid(z) equals the softmax of
    the logits (0, z), so the single row of weights becomes two.
    """
    scale, model = pipeline.named_steps["scale"], pipeline.named_steps["clf"]
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    linear = nn.Linear(coef.shape[1], coef.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(coef))
        linear.bias.copy_(torch.as_tensor(intercept))
    mean, std = _standardisation(None if scale == "passthrough" else scale, coef.shape[1])
    return ProbabilityHead(mean, std, linear).eval()


def mlp_module(head: MLPHead) -> ProbabilityHead:
    """The probe's fitted MLP head (its scaler and network) as a `ProbabilityHead`."""
    return ProbabilityHead(head.scaler.mean_, head.scaler.scale_, head.network).eval()


@dataclass
class FittedHead:
    """A head fitted on frozen embeddings (or a fine-tuned classifier) and its figures."""

    module: nn.Module  # embedding -> probabilities, or pixels -> probabilities (fine-tune)
    probabilities: np.ndarray  # (N_test, classes): the fitted model's, as `predict_proba` gives
    test_accuracy: float
    settings: dict[str, Any]


def fit_frozen_head(
    head: str,
    dataset: Dataset,
    fit_x: np.ndarray,
    test_x: np.ndarray,
    seed: int,
    hidden: int = 128,
    steps: int = 1000,
) -> FittedHead:
    """Fit a `head` (logreg or mlp) on frozen embeddings `fit_x` of the fit rows; score it on
    `test_x`, the test rows' embeddings."""
    fit_y, test_y, num_classes = labels_of(dataset)
    if head == "logreg":
        tuned = tune_logistic(fit_x, fit_y, seed)
        module, probabilities = logistic_module(tuned.model), tuned.model.predict_proba(test_x)
        settings = {**tuned.settings, "cv_accuracy": tuned.cv_accuracy, "cv_folds": tuned.folds}
    else:
        mlp = fit_mlp_head(fit_x, fit_y, num_classes, hidden, steps, seed)
        module, probabilities = mlp_module(mlp), mlp.predict_proba(test_x)
        settings = {"hidden": hidden, "steps": steps}
    accuracy = float((probabilities.argmax(1) == test_y).mean())
    return FittedHead(module, probabilities, accuracy, {**settings, "seed": seed})


def fit_fine_tuned(run: Path, dataset: Dataset, steps: int, seed: int) -> FittedHead:
    """Fine-tune the encoder of training run `run` under a linear head on every fit row."""
    index = np.arange(len(dataset.fit))
    model = fine_tune(run, dataset, index, steps, seed)
    logits = torch.from_numpy(classifier_logits(model, dataset.test.x))
    probabilities = torch.softmax(logits, dim=1).numpy()
    accuracy = float((probabilities.argmax(1) == dataset.test.y).mean())
    settings = {"run": str(run), "steps": steps, "seed": seed}
    preprocess = preprocessing_module(load_checkpoint(run / "best.pt"))
    return FittedHead(RawClassifier(model, preprocess).eval(), probabilities, accuracy, settings)


# --- the classifier graph ---------------------------------------------------------------------

CLASSIFIER_OUTPUT = "probabilities"
PARITY_TOLERANCE = 1e-5  # max |graph - fitted head| over the test rows' probabilities
ENCODER_TOLERANCE = 1e-4  # run vs exported encoder, as `aet export`'s parity check
MIN_OPSET = 18  # torch's ONNX exporter writes the head at the encoder's opset, at least this


def run_graph(
    model: onnx.ModelProto, input_name: str, output_name: str, x: np.ndarray
) -> np.ndarray:
    """Output `output_name` of a graph on `x`, onnxruntime on the CPU, in blocks of 1,024 rows."""
    session = onnx_session(model.SerializeToString())
    blocks = range(0, len(x), 1024)
    return np.concatenate(
        [session.run([output_name], {input_name: x[i : i + 1024]})[0] for i in blocks]
    )


def compose_classifier(
    encoder: onnx.ModelProto, card: ModelCard, head: nn.Module
) -> onnx.ModelProto:
    """One graph: the encoder's (pixels -> embedding, a novelty score's decoder dropped) then
    `head` (embedding -> probabilities), joined with `onnx.compose`."""
    encoder = onnx.load_from_string(embedding_graph(encoder, card.input.name, card.output.name))
    opset = max(onnx_opset(encoder), MIN_OPSET)
    if onnx_opset(encoder) < opset:
        encoder = version_converter.convert_version(encoder, opset)
    example = torch.zeros(2, card.output.embedding_dim)
    head_graph = to_onnx(head, example, opset, card.output.name, [CLASSIFIER_OUTPUT])
    head_graph.ir_version = encoder.ir_version
    # Prefix the head's names (the exporter names nodes alike in both graphs); keep its output.
    head_graph = compose.add_prefix(head_graph, "head/", rename_outputs=False)
    merged = compose.merge_models(
        encoder,
        head_graph,
        io_map=[(card.output.name, f"head/{card.output.name}")],
        outputs=[CLASSIFIER_OUTPUT],
    )
    onnx.checker.check_model(merged, full_check=True)
    return merged


def classifier_graph(
    fitted: FittedHead, encoder: onnx.ModelProto, card: ModelCard, test_rows: np.ndarray
) -> tuple[onnx.ModelProto, float]:
    """The deployable graph of `fitted` on the encoder of `card` (rows -> probabilities) and
    its max |graph - fitted head| over `test_rows` (raw units); `HeadError` beyond
    `PARITY_TOLERANCE`. A fine-tuned classifier is exported whole, a frozen head joined
    behind the encoder's own graph."""
    if isinstance(fitted.module, RawClassifier):
        opset = max(onnx_opset(encoder), MIN_OPSET)
        example = torch.from_numpy(test_rows[:2])
        graph = to_onnx(fitted.module, example, opset, card.input.name, [CLASSIFIER_OUTPUT])
    else:
        graph = compose_classifier(encoder, card, fitted.module)
    served = run_graph(graph, card.input.name, CLASSIFIER_OUTPUT, test_rows)
    diff = float(np.abs(served - fitted.probabilities).max())
    if not diff <= PARITY_TOLERANCE:
        raise HeadError(
            f"parity check failed: max |graph - fitted head| over {len(test_rows)} test "
            f"rows' probabilities: expected <= {PARITY_TOLERANCE:g}, got {diff:.3g}; "
            f"nothing written"
        )
    return graph, diff


def check_run_is_encoder(
    run: Path, encoder: onnx.ModelProto, card: ModelCard, rows: np.ndarray
) -> None:
    """Refuse a training run (`--fine-tune`) that is not the run the exported encoder of
    `card` came from: their embeddings of `rows` must agree within `ENCODER_TOLERANCE`."""
    checkpoint = load_checkpoint(run / "best.pt")
    preprocess = preprocessing_module(checkpoint)
    module = ExportedEncoder(checkpoint.build_model(), preprocess, with_score=False).eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(rows)).numpy()
    got = run_graph(encoder, card.input.name, card.output.name, rows)
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not diff <= ENCODER_TOLERANCE:
        raise HeadError(
            f"fine_tune: {run / 'best.pt'} is not the encoder {card.name} v{card.version} was "
            f"exported from (max |difference| of their embeddings {diff:.3g}, expected <= "
            f"{ENCODER_TOLERANCE:g})"
        )
