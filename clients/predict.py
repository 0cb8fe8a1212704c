"""`aet predict`: the class of every row of a data set, from a classifier model (`aet head`).

The extraction job of `aet embed` does the work, unchanged: the same backends (`--server`,
`--local`, `--ray`), the same resumable shards. A classifier's graph outputs probabilities
where an encoder's outputs embeddings, so the job's table holds the probabilities (N, K); it is
written beside the output (`<output stem>.probabilities.npz`, shards in `<that>.shards/`), then
turned into the predictions file and removed. An interrupted job resumes from its shards.

The output (`.npz` or `.parquet`, written atomically) has one row per data-set row: `id`,
`split`, `label` (the true class index, -1 when the data set has none), `predicted` (the most
probable class index), `predicted_label` (its name), `probabilities` (K per row); its metadata
names the data set, the model, its class labels and the backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aet.clients.embeddings import EmbeddingTable, ExtractionError, atomic_write, read_embeddings
from aet.clients.extract import NO_LABEL, SPLITS, EmbedConfig, extract, run_job
from aet.config import add_config_arguments, config_from_args
from aet.server.classification import Classification, classify

if TYPE_CHECKING:  # the backends import onnxruntime (and Ray): only when a job runs
    from aet.clients.backends import EmbeddingBackend


@dataclass
class PredictConfig(EmbedConfig):
    """`aet predict`: `aet embed`'s data, backend and job flags, on a classifier model."""

    output: Path | None = field(
        default=None,
        metadata={"help": "output file, .npz or .parquet (default: predicted/<dataset>.npz)"},
    )

    def default_output(self) -> Path:
        """predicted/<dataset>.npz."""
        return Path("predicted") / f"{self.data.name}.npz"

    @property
    def probabilities_path(self) -> Path:
        """Where the extraction job writes the probabilities before they become predictions."""
        return self.output_path.with_name(f"{self.output_path.stem}.probabilities.npz")


@dataclass(frozen=True)
class Predictions:
    """An `aet predict` output: the classification of every row, and where it came from."""

    ids: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64 true classes, NO_LABEL when unlabelled
    classification: Classification  # probabilities (N, K) and the top class of each row
    metadata: dict  # dataset, model (with class_labels), backend, created

    def accuracy(self, split: str) -> float | None:
        """Accuracy on the labelled rows of `split`, or None when it has none."""
        mask = (self.split == split) & (self.labels != NO_LABEL)
        if not mask.any():
            return None
        return float((self.classification.predicted[mask] == self.labels[mask]).mean())


def predictions_of(table: EmbeddingTable, class_labels: tuple[str, ...]) -> Predictions:
    """The predictions of an extraction table whose rows are a classifier's probabilities."""
    if table.embeddings.shape[1] != len(class_labels):
        raise ExtractionError(
            f"model {table.metadata['model']['name']}: expected a classifier whose output has "
            f"one column per class label; got {table.embeddings.shape[1]} columns and "
            f"{len(class_labels)} labels"
        )
    top = classify(table.embeddings, 1, class_labels)
    return Predictions(table.ids, table.split, table.labels, top, table.metadata)


def write_predictions(path: Path, predictions: Predictions) -> None:
    """Write `predictions` atomically as `.npz` or `.parquet` (with JSON metadata)."""
    top = predictions.classification
    columns = {
        "id": predictions.ids,
        "split": predictions.split.astype(str),
        "label": predictions.labels,
        "predicted": top.predicted,
        "predicted_label": top.predicted_labels.astype(str),
    }
    metadata = json.dumps(predictions.metadata)
    if path.suffix == ".npz":

        def write(temporary: Path) -> None:
            arrays: dict[str, Any] = {
                **columns,
                "probabilities": top.probabilities,
                "metadata": np.array(metadata),
            }
            with open(temporary, "wb") as handle:
                np.savez(handle, **arrays)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        classes = top.probabilities.shape[1]
        arrow = pa.table(
            {
                **{name: pa.array(values) for name, values in columns.items()},
                "probabilities": pa.FixedSizeListArray.from_arrays(
                    pa.array(top.probabilities.reshape(-1)), classes
                ),
            }
        ).replace_schema_metadata({"aet": metadata})

        def write(temporary: Path) -> None:
            pq.write_table(arrow, temporary)

    atomic_write(path, write)


def read_predictions(path: str | Path) -> Predictions:
    """Read an `aet predict` output written by `write_predictions`."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                columns = {name: archive[name] for name in archive.files}
            metadata = json.loads(str(columns.pop("metadata")))
        else:
            import pyarrow.parquet as pq

            arrow = pq.read_table(path)
            metadata = json.loads(arrow.schema.metadata[b"aet"])
            columns = {name: arrow.column(name).to_numpy() for name in arrow.column_names}
            columns["probabilities"] = np.stack(columns["probabilities"])
    except FileNotFoundError:
        raise ExtractionError(f"{path}: no such file; run aet predict first") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ExtractionError(f"{path}: not a readable aet predict output ({exc})") from exc
    probabilities = columns["probabilities"].astype(np.float32)
    top = classify(probabilities, 1, metadata["model"]["class_labels"])
    return Predictions(columns["id"], columns["split"].astype(str), columns["label"], top, metadata)


def predict(config: PredictConfig, backend: EmbeddingBackend) -> Predictions:
    """Run the job of `config` on an open `backend` serving a classifier; write its output."""
    if config.output_path.exists() and not config.overwrite:
        raise ExtractionError(
            f"{config.output_path}: already exists; pass --overwrite to replace it"
        )
    labels = backend.model.class_labels
    if not labels:
        raise ExtractionError(
            f"model {backend.model.name} v{backend.model.version}: expected a classifier "
            f"(aet head) with class labels, got an encoder; use aet embed for embeddings"
        )
    job = dataclasses.replace(config, output=config.probabilities_path, overwrite=True)
    extract(job, backend)
    table = read_embeddings(job.output_path)
    table.metadata["created"] = datetime.now(UTC).isoformat()
    predictions = predictions_of(table, labels)
    write_predictions(config.output_path, predictions)
    if job.output_path.is_dir():  # a job's output may be a folder of parts (Ray)
        shutil.rmtree(job.output_path)
    else:
        job.output_path.unlink()
    return predictions


def summary(config: PredictConfig, predictions: Predictions) -> str:
    """One line per split with labels: its accuracy; then where the output went."""
    lines = []
    for split in SPLITS:
        accuracy = predictions.accuracy(split)
        if accuracy is not None:
            rows = int((predictions.split == split).sum())
            lines.append(f"  {split}: accuracy {accuracy:.4f} on {rows} rows")
    model = predictions.metadata["model"]
    return "\n".join(
        [
            f"predicted {len(predictions.ids)} rows with {model['name']} v{model['version']} "
            f"({predictions.metadata['backend']}); wrote {config.output_path}",
            *lines,
        ]
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PredictConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(PredictConfig, args).with_model_data()

    def job(config: PredictConfig, backend: EmbeddingBackend) -> str:
        return summary(config, predict(config, backend))

    return run_job("predict", config, job, config.probabilities_path)
