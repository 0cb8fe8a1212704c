"""`aet head`: a classifier on frozen embeddings, exported as one deployable ONNX graph.

The head is fitted on the embeddings that the exported encoder (`--model exported/<encoder>`)
gives for the labelled fit rows (train + val) of the data set and split recorded in the
encoder's model.json, and scored on its test rows:

- `logreg`: the logistic probe's model (`training.probes.tune_logistic`): its inverse
  regularisation C and whether to standardise the embeddings are chosen by stratified
  cross-validation on the fit rows;
- `mlp`: the probe's one-hidden-layer MLP head on standardised embeddings;
- `--fine-tune runs/<name>`: the encoder's training run is fine-tuned end to end under a linear
  head, as `aet probe --fine-tune` does (the run must be the one the encoder was exported from).

The head becomes a torch module (standardisation, layers, softmax) exported with the same ONNX
exporter as the encoders, then joined behind the encoder's own graph with `onnx.compose`: one
graph `pixels -> probabilities`, preprocessing included. Before anything is written, the graph's
probabilities on the test rows must match the fitted head's `predict_proba` within
`PARITY_TOLERANCE`. The result is a model of its own in the repository (`<name>/<version>/`)
whose model.json records the class labels, the encoder (name, version, sha256), the split and
the test accuracy at fit time.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime
import torch
from onnx import compose, version_converter
from torch import nn

from aet.clients.embeddings import EmbeddingTable
from aet.clients.extract import extraction_rows
from aet.clients.probe import embed_in_process
from aet.config import ConfigError, add_config_arguments, config_from_args
from aet.repository import (
    MODEL_NAME_PATTERN,
    ClassifierSpec,
    ModelCard,
    ModelVersion,
    OutputSpec,
    find_model_version,
    scan_repository,
    write_version,
)
from aet.training.checkpoint import load_checkpoint
from aet.training.data import Dataset
from aet.training.dataspec import DataSpec, resolve_data
from aet.training.export import (
    ExportedEncoder,
    library_versions,
    onnx_opset,
    preprocessing_module,
    to_onnx,
)
from aet.training.heads import HeadError, fit_fine_tuned, fit_frozen_head, labels_of

OUTPUT_NAME = "probabilities"
HEADS = ("logreg", "mlp")
PARITY_TOLERANCE = 1e-5  # max |graph - fitted head| over the test rows' probabilities
ENCODER_TOLERANCE = 1e-4  # run vs exported encoder, as `aet export`'s parity check
MIN_OPSET = 18  # torch's ONNX exporter writes the head at the encoder's opset, at least this


@dataclass
class HeadConfig:
    """`aet head`: which encoder, which head, which data, where the classifier goes."""

    model: Path | None = field(
        default=None,
        metadata={"help": "the encoder: exported/<model>[/<version>] (default version: latest)"},
    )
    name: str | None = field(
        default=None, metadata={"help": "model name of the classifier in the repository"}
    )
    repository: Path | None = field(
        default=None,
        metadata={"help": "model repository to write into (default: the encoder's repository)"},
    )
    head: str = field(
        default="logreg",
        metadata={
            "help": "logreg: logistic regression, C and standardisation chosen by stratified "
            "CV; mlp: one-hidden-layer MLP on standardised embeddings",
            "choices": HEADS,
        },
    )
    fine_tune: Path | None = field(
        default=None,
        metadata={
            "help": "training run runs/<name> the encoder was exported from: fine-tune it end to "
            "end under a linear head instead of fitting a head on frozen embeddings"
        },
    )
    data: DataSpec = field(default_factory=DataSpec)
    allow_split_mismatch: bool = field(
        default=False,
        metadata={
            "help": "fit on a split other than the encoder's pretraining split (its test rows "
            "may then include rows the encoder was trained on; recorded in model.json)"
        },
    )
    hidden: int = field(default=128, metadata={"help": "mlp: hidden units"})
    steps: int = field(
        default=1000, metadata={"help": "mlp and fine-tuning: Adam steps on mini-batches of 128"}
    )

    def __post_init__(self):
        if self.model is None:
            raise ConfigError("model: expected --model exported/<encoder>[/<version>]; got none")
        if self.name is None or not MODEL_NAME_PATTERN.fullmatch(self.name):
            raise ConfigError(
                f"name: expected --name matching {MODEL_NAME_PATTERN.pattern}; got {self.name!r}"
            )
        for name in ("hidden", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer; got {getattr(self, name)}")
        if self.fine_tune is not None and self.head != "logreg":
            raise ConfigError(
                f"head: --fine-tune trains a linear head with the encoder; got --head {self.head}"
            )

    @property
    def kind(self) -> str:
        """The head as model.json names it: logreg, mlp or fine-tune."""
        return "fine-tune" if self.fine_tune is not None else self.head


# --- the data the encoder was pretrained on ----------------------------------------------------


def encoder_dataset(config: HeadConfig, model_dir: Path) -> Dataset:
    """The data set and split of the encoder's model.json (`aet probe`'s leak-proof
    resolution: a flag that changes the split is refused unless `--allow-split-mismatch`,
    and then recorded in the head's card), checked to have a label for every class."""
    spec, note = resolve_data(config.data, model_dir, allow_mismatch=config.allow_split_mismatch)
    dataset = spec.load()
    if note is not None:
        dataset.source["split_mismatch"] = note
    fit_y, _, num_classes = labels_of(dataset)
    missing = sorted(set(range(num_classes)) - set(np.unique(fit_y).tolist()))
    if missing:
        raise HeadError(
            f"data set {dataset.name}: classes {missing} have no training rows (train + val); "
            f"expected every class of 0..{num_classes - 1}"
        )
    return dataset


def class_names(dataset: Dataset) -> tuple[str, ...]:
    """The data set's class names (image folders' subfolder names), else "0", "1", ..."""
    names = dataset.source.get("classes")
    num_classes = labels_of(dataset)[2]
    if names is not None and len(names) == num_classes:
        return tuple(str(name) for name in names)
    return tuple(str(index) for index in range(num_classes))


# --- the graph --------------------------------------------------------------------------------


def run_graph(
    model: onnx.ModelProto, input_name: str, output_name: str, x: np.ndarray
) -> np.ndarray:
    """Output `output_name` of a graph on `x`, onnxruntime on the CPU, in blocks of 1,024 rows."""
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return np.concatenate(
        [
            session.run([output_name], {input_name: x[i : i + 1024]})[0]
            for i in range(0, len(x), 1024)
        ]
    )


def embedding_graph(encoder: onnx.ModelProto, card: ModelCard) -> onnx.ModelProto:
    """The encoder's graph pruned to `input -> embedding` (a novelty score's decoder dropped)."""
    return onnx.utils.Extractor(encoder).extract_model([card.input.name], [card.output.name])


def compose_classifier(
    encoder: onnx.ModelProto, card: ModelCard, head: nn.Module
) -> onnx.ModelProto:
    """One graph: the encoder's (pixels -> embedding) then `head` (embedding -> probabilities)."""
    encoder = embedding_graph(encoder, card)
    opset = max(onnx_opset(encoder), MIN_OPSET)
    if onnx_opset(encoder) < opset:
        encoder = version_converter.convert_version(encoder, opset)
    example = torch.zeros(2, card.output.embedding_dim)
    head_graph = to_onnx(head, example, opset, card.output.name, [OUTPUT_NAME])
    head_graph.ir_version = encoder.ir_version
    # Prefix the head's names (the exporter names nodes alike in both graphs); keep its output.
    head_graph = compose.add_prefix(head_graph, "head/", rename_outputs=False)
    merged = compose.merge_models(
        encoder,
        head_graph,
        io_map=[(card.output.name, f"head/{card.output.name}")],
        outputs=[OUTPUT_NAME],
    )
    onnx.checker.check_model(merged, full_check=True)
    return merged


def check_run_is_encoder(
    config: HeadConfig, encoder: onnx.ModelProto, card: ModelCard, rows: np.ndarray
) -> None:
    """Refuse a `--fine-tune` run that is not the run the exported encoder came from."""
    assert config.fine_tune is not None  # called only for --fine-tune
    checkpoint = load_checkpoint(config.fine_tune / "best.pt")
    preprocess = preprocessing_module(checkpoint)
    module = ExportedEncoder(checkpoint.build_model(), preprocess, with_score=False).eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(rows)).numpy()
    got = run_graph(encoder, card.input.name, card.output.name, rows)
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not diff <= ENCODER_TOLERANCE:
        raise HeadError(
            f"fine_tune: {config.fine_tune / 'best.pt'} is not the encoder {config.model} was "
            f"exported from (max |difference| of their embeddings {diff:.3g}, expected <= "
            f"{ENCODER_TOLERANCE:g})"
        )


def _checked_embeddings(table: EmbeddingTable, card: ModelCard, dataset: Dataset) -> EmbeddingTable:
    """`table` if the encoder of `card` made it from the rows of `dataset`, else `HeadError`."""
    model = table.metadata["model"]
    if model["sha256"] != card.sha256:
        raise HeadError(
            f"embeddings: made by {model['name']} v{model['version']} (sha256 "
            f"{model['sha256'][:12]}...), expected the encoder {card.name} v{card.version} "
            f"(sha256 {card.sha256[:12]}...)"
        )
    rows = extraction_rows(dataset)
    if not (np.array_equal(rows.labels, table.labels) and np.array_equal(rows.split, table.split)):
        raise HeadError(
            f"embeddings: their {len(table.ids)} rows are not the {len(rows)} rows of data set "
            f"{dataset.name} split as the encoder's model.json says"
        )
    return table


def _check_target(config: HeadConfig, encoder: ModelVersion, repository: Path) -> None:
    """The head gets its own model: not the encoder's name, not over an existing encoder."""
    if config.name == encoder.name and repository.resolve() == encoder.path.parent.parent.resolve():
        raise HeadError(
            f"name: expected a model name other than the encoder's ({encoder.name!r}); the head "
            f"is a model of its own"
        )
    if not repository.is_dir():
        return
    for found in scan_repository(repository):
        if found.name == config.name and found.card is not None and found.card.classifier is None:
            raise HeadError(
                f"name: {repository / config.name} holds an encoder (v{found.version}); "
                f"expected a new name or a classifier's"
            )


def build_head(config: HeadConfig, embeddings: EmbeddingTable | None = None) -> Path:
    """Fit, export, check and write the classifier; returns its new version folder.

    `embeddings` (an `aet embed` table of this encoder over this data set, e.g. served ones)
    saves computing them in-process. Nothing is written unless every check passes.
    """
    assert config.model is not None and config.name is not None  # checked by HeadConfig
    found = find_model_version(config.model)  # refuses a version whose sha256 does not match
    card = found.usable_card
    repository = config.repository if config.repository is not None else found.path.parent.parent
    _check_target(config, found, repository)
    encoder = onnx.load_from_string(found.verified_bytes())
    dataset = encoder_dataset(config, found.path)
    seed = dataset.source["seed"]
    test_pixels = dataset.raw(dataset.test.x)  # (N_test, *input shape): what the graph takes
    if config.fine_tune is not None:
        check_run_is_encoder(config, encoder, card, test_pixels[:256])
        fitted = fit_fine_tuned(config.fine_tune, dataset, config.steps, seed)
        example = torch.from_numpy(test_pixels[:2])
        opset = max(onnx_opset(encoder), MIN_OPSET)
        graph = to_onnx(fitted.module, example, opset, card.input.name, [OUTPUT_NAME])
    else:
        table = (
            embed_in_process(found.path, dataset)  # checks that the encoder takes the data
            if embeddings is None
            else _checked_embeddings(embeddings, card, dataset)
        )
        fit_x = np.concatenate([table.part("train")[0], table.part("val")[0]])
        test_x = table.part("test")[0]
        fitted = fit_frozen_head(
            config.head, dataset, fit_x, test_x, seed, config.hidden, config.steps
        )
        graph = compose_classifier(encoder, card, fitted.module)
    served = run_graph(graph, card.input.name, OUTPUT_NAME, test_pixels)
    diff = float(np.abs(served - fitted.probabilities).max())
    if not diff <= PARITY_TOLERANCE:
        raise HeadError(
            f"parity check failed: max |graph - fitted head| over {len(test_pixels)} test "
            f"rows' probabilities: expected <= {PARITY_TOLERANCE:g}, got {diff:.3g}; "
            f"nothing written"
        )
    onnx_bytes = graph.SerializeToString()
    labels = class_names(dataset)
    head_card = ModelCard.draft(
        config.name,
        "classifier",
        hyperparameters={"head": config.kind, **fitted.settings, "encoder": card.hyperparameters},
        input=card.input,
        output=OutputSpec(name=OUTPUT_NAME, dtype="float32", embedding_dim=len(labels)),
        preprocessing=[
            *card.preprocessing,
            f"encoder: {card.name} v{card.version} ({card.architecture}) -> "
            f"{card.output.name} ({card.output.embedding_dim})",
            f"head: {config.kind} -> softmax over {len(labels)} classes",
        ],
        dataset=dataset.source,
        metrics={
            "test_accuracy": fitted.test_accuracy,
            "fit_rows": float(len(dataset.fit)),
            "test_rows": float(len(dataset.test)),
        },
        opset=onnx_opset(graph),
        parity_max_abs_diff=diff,
        parity_samples=len(test_pixels),
        library_versions={**library_versions(), "scikit-learn": _version("scikit-learn")},
        standardizer=card.standardizer,  # vectors: what the graph's first step standardises
        classifier=ClassifierSpec(
            labels=labels,
            encoder={"name": card.name, "version": card.version, "sha256": card.sha256},
            head=config.kind,
            settings=fitted.settings,
        ),
    )
    return write_version(repository, config.name, onnx_bytes, head_card)


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, HeadConfig)


def run(args: argparse.Namespace) -> int:
    from aet.repository import CARD_FILE, read_model_card

    config = config_from_args(HeadConfig, args)
    path = build_head(config)
    card = read_model_card(path / CARD_FILE)
    assert card.classifier is not None  # build_head writes classifier cards
    encoder = card.classifier.encoder
    print(
        f"head {card.classifier.head} on {encoder['name']} v{encoder['version']} -> {path}\n"
        f"  {card.input.name} (batch, {', '.join(map(str, card.input.shape))}) -> "
        f"{card.output.name} (batch, {card.output.embedding_dim}); classes "
        f"{', '.join(card.classifier.labels)}\n"
        f"  test accuracy {card.metrics['test_accuracy']:.4f} on {int(card.metrics['test_rows'])} "
        f"rows; settings {card.classifier.settings}\n"
        f"  parity: max |graph - fitted head| {card.parity_max_abs_diff:.2g} over "
        f"{card.parity_samples} test rows"
    )
    return 0
