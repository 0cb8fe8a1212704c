"""`aet probe`: classifiers on frozen embeddings, beside raw pixels and PCA codes of the same size.

Each feature set (the encoder's embeddings, the raw pixels, PCA with as many components as the
embedding has dimensions) gets the fair probes of `training.probes` (logistic regression and
k-NN, each tuned by cross-validation on its labelled subset only) and a small PyTorch MLP head,
trained on 100, 1,000 and all labelled training rows (train + val, the
same stratified subsets for every feature set) and scored on the test split. With
`--fine-tune runs/<name>` the encoder itself is trained too, with a linear head, to show what
freezing costs. Writes `results.md`, `results.json`, `accuracy_vs_labels.png` and
`confusion_matrix.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import confusion_matrix

from aet.clients.embeddings import EmbeddingTable, read_embeddings
from aet.clients.extract import check_model_fits, extraction_rows, rescaled
from aet.config import ConfigError, add_config_arguments, config_from_args
from aet.errors import UserError
from aet.training.data import Dataset, require_classes
from aet.training.dataspec import DataSpec, resolve_data
from aet.training.evaluate import fit_pca
from aet.training.heads import fine_tune_probe, fit_mlp_head, mlp_probe
from aet.training.probes import (
    PROBE_FUNCTIONS,
    FeatureSet,
    format_settings,
    label_subset,
    probe_features,
)

CLASSIFIERS = {
    "logreg": "logistic regression",
    "knn": "k-NN",
    "mlp": "MLP head",
    "fine-tune": "linear head, encoder trained too",
}


class ProbeError(UserError):
    """The embeddings and the data set do not fit together, or there is nothing to probe."""


@dataclass
class ProbeConfig:
    """`aet probe`: where the embeddings come from, how many labels, where results go."""

    embeddings: Path | None = field(
        default=None,
        metadata={
            "help": "an `aet embed` output (.npz or .parquet); its data set is reloaded for the "
            "pixel and PCA baselines"
        },
    )
    model: Path | None = field(
        default=None,
        metadata={
            "help": "instead of --embeddings: exported/<model>[/<version>], run in-process on the "
            "data set and split recorded in its model.json"
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "with --model: where the encoder runs (auto: cuda when a GPU is usable)",
            "choices": ["auto", "cpu", "cuda"],
        },
    )
    data: DataSpec = field(default_factory=DataSpec)
    allow_split_mismatch: bool = field(
        default=False,
        metadata={
            "help": "probe on a split other than pretraining's (test rows the encoder may have "
            "trained on); results are marked 'split differs from pretraining'"
        },
    )
    label_counts: list[int] = field(
        default_factory=lambda: [100, 1000],
        metadata={"help": "numbers of training labels to probe with; all labels are always added"},
    )
    hidden: int = field(default=128, metadata={"help": "MLP head: hidden units"})
    steps: int = field(
        default=1000,
        metadata={"help": "MLP head and fine-tuning: Adam steps on mini-batches of 128"},
    )
    fine_tune: Path | None = field(
        default=None,
        metadata={
            "help": "training run folder runs/<name> (its best.pt): also fine-tune the encoder"
        },
    )
    output: Path | None = field(
        default=None,
        metadata={"help": "results folder (default: runs/probe/<embeddings or model name>)"},
    )

    def __post_init__(self):
        if (self.embeddings is None) == (self.model is None):
            raise ConfigError(
                "embeddings / model: expected exactly one of --embeddings or "
                f"--model; got embeddings={self.embeddings}, model={self.model}"
            )
        if self.embeddings is not None:
            given = [f"--{name.replace('_', '-')}" for name in self.data.given() if name != "seed"]
            if given:
                raise ConfigError(
                    f"{', '.join(given)}: only with --model; --embeddings {self.embeddings} "
                    f"records the data set and split it was extracted from"
                )
            if self.device != "auto":
                raise ConfigError(
                    f"device: only with --model (--embeddings are already computed); "
                    f"got --device {self.device}"
                )
        if not self.label_counts or min(self.label_counts) < 1:
            raise ConfigError(f"label_counts: expected positive numbers; got {self.label_counts}")
        for name in ("hidden", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer; got {getattr(self, name)}")
        if self.output is None:
            named_by = self.embeddings or self.model  # one of the two, checked above
            assert named_by is not None
            source = named_by.stem if self.embeddings else named_by.resolve().name
            self.output = Path("runs") / "probe" / source

    @property
    def output_dir(self) -> Path:
        """`output`, defaulted from the input's name by `__post_init__`."""
        assert self.output is not None
        return self.output


# --- inputs ------------------------------------------------------------------------------


def dataset_of(table: EmbeddingTable, source: str) -> Dataset:
    """Reload the data set an extraction was made from and check it is the same rows."""
    dataset = DataSpec.from_record(table.metadata["dataset"]).load()
    rows = extraction_rows(dataset)
    if len(rows) != len(table.ids) or not (
        np.array_equal(rows.labels, table.labels) and np.array_equal(rows.split, table.split)
    ):
        raise ProbeError(
            f"{source}: its {len(table.ids)} rows do not match data set "
            f"{table.metadata['dataset']} ({len(rows)} rows, or other labels or "
            f"splits); was the data changed since the extraction?"
        )
    return dataset


def embed_in_process(model_dir: Path, dataset: Dataset, device: str = "auto") -> EmbeddingTable:
    """Every row of `dataset` through the exported encoder in `model_dir` (onnxruntime on
    `device`: auto, cpu or cuda)."""
    from aet.clients.backends import LocalBackend

    rows = extraction_rows(dataset)
    with LocalBackend(model_dir, device=device) as backend:
        scale = check_model_fits(backend.model, dataset)
        blocks = backend.embed_rows(rescaled(rows.pixels, scale), batch_size=1024)
        embeddings = np.concatenate([block[backend.model.output_name] for block in blocks])
        model = asdict(backend.model)
    return EmbeddingTable(
        embeddings,
        np.arange(len(rows)),
        rows.labels,
        rows.split,
        {"dataset": {"name": dataset.name}, "model": model},
    )


# --- classifiers -----------------------------------------------------------------------------


def feature_sets(table: EmbeddingTable, dataset: Dataset, seed: int) -> list[FeatureSet]:
    """The frozen embeddings, the raw pixels, and PCA codes of the embedding's size."""
    fit_x, test_x = dataset.fit.x, dataset.test.x
    fit_pixels, test_pixels = fit_x.reshape(len(fit_x), -1), test_x.reshape(len(test_x), -1)
    fit_embeddings = np.concatenate([table.part("train")[0], table.part("val")[0]])
    dim = table.embeddings.shape[1]
    pca = fit_pca(dataset.train.x, dim, seed)
    return [
        FeatureSet("embedding", fit_embeddings, table.part("test")[0]),
        FeatureSet("pixels", fit_pixels, test_pixels),
        FeatureSet(
            f"PCA-{pca.n_components_}", pca.transform(fit_pixels), pca.transform(test_pixels)
        ),
    ]


@dataclass
class ProbeResults:
    """Accuracies per (features, classifier) for each number of training labels."""

    dataset: str
    model: dict  # name, version, sha256, embedding_dim of the encoder
    label_counts: list[int]
    accuracy: dict[str, dict[str, list[float]]]  # features -> classifier -> per label count
    # features -> tuned classifier (logreg, knn) -> per label count: what CV chose (probes.py)
    settings: dict[str, dict[str, list[dict]]]
    confusion: list[list[int]]  # MLP head on embeddings, all labels: rows true, columns predicted
    split_warning: str | None = None  # "split differs from pretraining: ..." when it does

    def markdown(self) -> str:
        """The results as a Markdown table, one row per (features, classifier)."""
        total = self.label_counts[-1]
        heads = [f"{n:,} labels" for n in self.label_counts[:-1]] + [f"all ({total:,})"]
        lines = [
            f"Test accuracy on {self.dataset}, encoder {self.model['name']} "
            f"v{self.model['version']} ({self.model['embedding_dim']}-d)",
            *(["", f"**Warning: {self.split_warning}**"] if self.split_warning else []),
            "",
            "| features | classifier | " + " | ".join(heads) + " |",
            "|---|---|" + "---:|" * len(heads),
        ]
        for features, by_classifier in self.accuracy.items():
            for classifier, accuracies in by_classifier.items():
                cells = " | ".join(f"{a:.3f}" for a in accuracies)
                lines.append(f"| {features} | {CLASSIFIERS[classifier]} | {cells} |")
        lines += ["", "Settings chosen by cross-validation on each labelled subset:", ""]
        for features, by_tuned in self.settings.items():
            for classifier, choices in by_tuned.items():
                cells = "; ".join(format_settings(s) for s in choices)
                lines.append(f"- {features}, {CLASSIFIERS[classifier]}: {cells}")
        return "\n".join(lines) + "\n"


def probe(table: EmbeddingTable, dataset: Dataset, config: ProbeConfig) -> ProbeResults:
    """Train and score every classifier on every feature set for every label count.

    Without `--seed` the heads are seeded with the split's seed.
    """
    seed = config.data.seed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # heads this small only lose time to thread synchronisation
    try:
        results = _probe(
            table, dataset, config, dataset.source.get("seed", 0) if seed is None else seed
        )
    finally:
        torch.set_num_threads(threads)
    return dataclasses.replace(results, split_warning=table.metadata.get("split_mismatch"))


def _probe(table: EmbeddingTable, dataset: Dataset, config: ProbeConfig, seed: int) -> ProbeResults:
    fit_y, test_y, num_classes = dataset.fit.y, dataset.test.y, dataset.num_classes
    if fit_y is None or test_y is None or num_classes is None:
        raise ProbeError(f"data set {dataset.name}: has no labels; nothing to probe")
    require_classes(dataset, "a probe")
    counts = sorted({min(n, len(fit_y)) for n in config.label_counts} | {len(fit_y)})
    mlp = functools.partial(
        mlp_probe, num_classes=num_classes, hidden=config.hidden, steps=config.steps
    )
    features = feature_sets(table, dataset, seed)
    probed = probe_features(features, fit_y, test_y, counts, seed, {**PROBE_FUNCTIONS, "mlp": mlp})
    accuracy = probed["accuracy"]
    if config.fine_tune is not None:
        accuracy["embedding"]["fine-tune"] = [
            fine_tune_probe(
                config.fine_tune, dataset, label_subset(fit_y, n, seed), config.steps, seed
            )
            for n in counts
        ]
    # the MLP head on the embeddings with all labels, class by class
    head = fit_mlp_head(features[0].fit, fit_y, num_classes, config.hidden, config.steps, seed)
    predicted = head.logits(features[0].test).argmax(1)
    confusion = confusion_matrix(test_y, predicted, labels=range(num_classes)).tolist()
    settings = {  # what cross-validation chose: the tuned probes only
        name: {probe: chosen for probe, chosen in by_probe.items() if probe in PROBE_FUNCTIONS}
        for name, by_probe in probed["settings"].items()
    }
    return ProbeResults(
        dataset.name, table.metadata["model"], counts, accuracy, settings, confusion
    )


def write_results(results: ProbeResults, folder: Path) -> dict[str, Path]:
    """Write the table (Markdown, JSON) and the two plots into `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": folder / "results.md",
        "json": folder / "results.json",
        "accuracy_plot": folder / "accuracy_vs_labels.png",
        "confusion_plot": folder / "confusion_matrix.png",
    }
    paths["markdown"].write_text(results.markdown())
    paths["json"].write_text(json.dumps(asdict(results), indent=2) + "\n")

    figure, axes = plt.subplots(figsize=(7, 4.5))
    styles = {"embedding": "-", "pixels": "--"}
    for features, by_classifier in results.accuracy.items():
        for classifier, accuracies in by_classifier.items():
            axes.plot(
                results.label_counts,
                accuracies,
                styles.get(features, ":"),
                marker={"logreg": "o", "knn": "v", "mlp": "s"}.get(classifier, "^"),
                label=f"{features}, {CLASSIFIERS[classifier]}",
            )
    axes.set(
        xscale="log",
        xlabel="training labels",
        ylabel="test accuracy",
        title=f"{results.dataset}: accuracy against labels",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths["accuracy_plot"], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay(np.array(results.confusion)).plot(ax=axes, colorbar=False)
    axes.set_title(f"MLP head on embeddings, {results.label_counts[-1]:,} labels")
    figure.tight_layout()
    figure.savefig(paths["confusion_plot"], dpi=120)
    plt.close(figure)
    return paths


def load_inputs(config: ProbeConfig) -> tuple[EmbeddingTable, Dataset]:
    """The embeddings and their data set, from an extraction output or an in-process run.

    With `--model`, a split that differs from pretraining's is recorded in the table's
    metadata (`split_mismatch`) and marks the results.
    """
    if config.embeddings is not None:
        table = read_embeddings(config.embeddings)
        return table, dataset_of(table, str(config.embeddings))
    assert config.model is not None  # ProbeConfig requires --embeddings or --model
    spec, note = resolve_data(config.data, config.model, allow_mismatch=config.allow_split_mismatch)
    dataset = spec.load()
    table = embed_in_process(config.model, dataset, config.device)
    if note is not None:
        table.metadata["split_mismatch"] = note
    return table, dataset


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ProbeConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(ProbeConfig, args)
    table, dataset = load_inputs(config)
    results = probe(table, dataset, config)
    paths = write_results(results, config.output_dir)
    print(results.markdown())
    print(f"results: {paths['markdown']}, {paths['json']}")
    print(f"plots: {paths['accuracy_plot']}, {paths['confusion_plot']}")
    return 0
