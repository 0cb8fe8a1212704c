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

The graph is `training.heads.classifier_graph`'s: one graph `pixels -> probabilities`,
preprocessing included, whose probabilities on the test rows match the fitted head's within
`PARITY_TOLERANCE` before anything is written. The result is a model of its own in the
repository (`<name>/<version>/`) whose model.json records the class labels, the encoder (name,
version, sha256), the split and the test accuracy at fit time.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

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
from aet.training.data import Dataset
from aet.training.dataspec import DataSpec, resolve_data
from aet.training.export import (
    library_versions,
    onnx_opset,
)
from aet.training.heads import (
    CLASSIFIER_OUTPUT,
    HeadError,
    check_run_is_encoder,
    classifier_graph,
    fit_fine_tuned,
    fit_frozen_head,
    labels_of,
)

HEADS = ("logreg", "mlp")


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
        check_run_is_encoder(config.fine_tune, encoder, card, test_pixels[:256])
        fitted = fit_fine_tuned(config.fine_tune, dataset, config.steps, seed)
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
    graph, diff = classifier_graph(fitted, encoder, card, test_pixels)
    onnx_bytes = graph.SerializeToString()
    labels = class_names(dataset)
    head_card = ModelCard.draft(
        config.name,
        "classifier",
        hyperparameters={"head": config.kind, **fitted.settings, "encoder": card.hyperparameters},
        input=card.input,
        output=OutputSpec(name=CLASSIFIER_OUTPUT, dtype="float32", embedding_dim=len(labels)),
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
