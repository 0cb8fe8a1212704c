"""`aet embed`: embeddings of every row of a data set, through a server, onnxruntime or Ray.

All rows of train, val and test are embedded, in that order, with a `split` column, so that
`aet probe` can train on the fit part and score on the test part. The job runs in shards of
`shard_size` rows written to `<output>.shards/`: each shard is written atomically, and a
restarted job validates and skips the finished ones (whatever backend wrote them: the backends
give identical embeddings). When every shard is there they are merged into the output (`.npz`
or `.parquet`), written atomically, and the shard folder is removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aet.config import ConfigError, add_config_arguments, config_from_args
from aet.errors import UserError
from aet.training.data import DATASETS, Dataset, load_dataset

if TYPE_CHECKING:  # the backends import onnxruntime (and Ray): only when a job runs
    from aet.clients.backends import EmbeddingBackend, ModelIdentity

SPLITS = ("train", "val", "test")
FORMATS = (".npz", ".parquet")
NO_LABEL = -1  # the label of rows from unlabelled data sets
MANIFEST = "manifest.json"
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


class ExtractionError(UserError):
    """An extraction output, shard or manifest is unreadable or belongs to another job."""


@dataclass
class EmbedConfig:
    """`aet embed`: which data, which model through which backend, where the output goes."""

    dataset: str = field(
        default="digits",
        metadata={"help": "data set of the training registry", "choices": sorted(DATASETS)},
    )
    data_path: Path | None = field(
        default=None, metadata={"help": "file or folder of the data set (digits needs none)"}
    )
    seed: int = field(default=0, metadata={"help": "split seed; the same as at pretraining"})
    test_fraction: float | None = field(
        default=None,
        metadata={"help": "held-out test fraction, as at pretraining (default: the data set's)"},
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "validation fraction of the rest, as at pretraining"}
    )
    limit: int | None = field(
        default=None, metadata={"help": "keep the first N rows of a seeded shuffle (quick runs)"}
    )
    columns: list[str] | None = field(
        default=None,
        metadata={"help": "feature columns of a table (csv, parquet, 2-D npz), as at pretraining"},
    )
    label_column: str | None = field(
        default=None, metadata={"help": "class label column of a csv or parquet table"}
    )
    drop_missing: bool = field(
        default=False,
        metadata={"help": "drop table rows with a missing or infinite value (default: fail)"},
    )
    score: bool = field(
        default=False,
        metadata={
            "help": "also write each row's novelty score, reconstruction_error (runs the "
            "decoder too)"
        },
    )
    server: str | None = field(
        default=None,
        metadata={"help": "backend: embed through the gRPC server at host:port (needs --model)"},
    )
    model: str | None = field(default=None, metadata={"help": "model name on the server"})
    version: int | None = field(
        default=None, metadata={"help": "model version on the server (default: latest)"}
    )
    local: Path | None = field(
        default=None,
        metadata={
            "help": "backend: run exported/<model>[/<version>] with onnxruntime in this process"
        },
    )
    ray: Path | None = field(
        default=None,
        metadata={
            "help": "backend: run exported/<model>[/<version>] on Ray Data, one onnxruntime actor "
            "per worker"
        },
    )
    ray_address: str | None = field(
        default=None,
        metadata={"help": "Ray cluster to join (default: start a local Ray with --workers CPUs)"},
    )
    workers: int = field(default=2, metadata={"help": "Ray actors, one CPU each"})
    batch_size: int = field(
        default=512,
        metadata={
            "help": "rows per request or onnxruntime run (requests are split further to fit the "
            "message limit)"
        },
    )
    shard_size: int = field(default=4096, metadata={"help": "rows per resumable shard"})
    output: Path | None = field(
        default=None,
        metadata={"help": "output file, .npz or .parquet (default: extracted/<dataset>.npz)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output file"})
    timeout: float = field(default=30.0, metadata={"help": "server: seconds per request"})
    token_env: str = field(
        default="AET_TOKEN",
        metadata={
            "help": "server: environment variable holding the bearer token, if the server wants one"
        },
    )
    root_cert: Path | None = field(
        default=None, metadata={"help": "server: PEM root certificate; turns TLS on"}
    )
    client_cert: Path | None = field(
        default=None, metadata={"help": "server: PEM client certificate for mutual TLS"}
    )
    client_key: Path | None = field(
        default=None, metadata={"help": "server: PEM client private key for mutual TLS"}
    )
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})

    def __post_init__(self):
        chosen = [
            flag
            for flag, value in (
                ("--server", self.server),
                ("--local", self.local),
                ("--ray", self.ray),
            )
            if value is not None
        ]
        if len(chosen) != 1:
            raise ConfigError(
                f"backend: expected exactly one of --server, --local, --ray; "
                f"got {', '.join(chosen) or 'none'}"
            )
        if self.server is not None and not self.model:
            raise ConfigError(f"model: --server {self.server} needs --model <name>; got none")
        if self.server is None and (self.model or self.version):
            raise ConfigError(
                "model, version: only for --server; --local and --ray take the "
                f"model folder; got model={self.model} version={self.version}"
            )
        for name in ("workers", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer; got {getattr(self, name)}")
        if self.output is None:
            self.output = Path("extracted") / f"{self.dataset}.npz"
        if self.output.suffix not in FORMATS:
            raise ConfigError(
                f"output: expected a file ending in {' or '.join(FORMATS)}; got {self.output}"
            )

    def dataset_args(self) -> dict[str, Any]:
        """The `load_dataset` arguments, as recorded in the output for `aet probe`."""
        return {
            "name": self.dataset,
            "path": None if self.data_path is None else str(self.data_path),
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "val_fraction": self.val_fraction,
            "limit": self.limit,
            **{  # table options only when given: image data sets take none
                name: value
                for name, value in (
                    ("columns", self.columns),
                    ("label_column", self.label_column),
                    ("drop_missing", self.drop_missing),
                )
                if value
            },
        }


# --- the rows of a data set -----------------------------------------------------------------


@dataclass(frozen=True)
class ExtractionRows:
    """Every row of a data set in train, val, test order, as the encoder graph takes them."""

    pixels: np.ndarray  # (N, C, H, W): uint8 when the raw pixels are bytes, else float32;
    # (N, D) float32 features in their own units for vectors
    labels: np.ndarray  # (N,) int64, NO_LABEL when the data set has none
    split: np.ndarray  # (N,) str: "train", "val" or "test"

    def __len__(self) -> int:
        return len(self.pixels)


def raw_pixels(x: np.ndarray, raw_max: float) -> np.ndarray:
    """Images in [0, 1] back in the raw range the exported graph expects, `[0, raw_max]`.

    Pixels that were bytes (digits 0..16, 8-bit images 0..255) come back exactly as uint8, a
    quarter of the bytes on the wire; anything else stays float32.
    """
    scaled = x * np.float32(raw_max)
    if raw_max <= 255:
        rounded = np.rint(scaled)
        if np.abs(scaled - rounded).max(initial=0.0) < 1e-3:
            return rounded.astype(np.uint8)
    return scaled.astype(np.float32)


def check_model_fits(model: ModelIdentity, dataset: Dataset) -> None:
    """Raise `ExtractionError` unless the encoder takes the data set's rows: the same shape
    and the same raw pixel range (vectors: no range, the graph standardises them)."""
    expected_max = None if dataset.is_vectors else dataset.raw_max
    if tuple(model.input_shape) != dataset.image_shape or model.max_value != expected_max:
        raise ExtractionError(
            f"model {model.name} v{model.version}: expected images of shape "
            f"{tuple(model.input_shape)} with pixel values up to {model.max_value}; data set "
            f"{dataset.name} has shape {dataset.image_shape} with values up to "
            f"{expected_max}"
        )


def extraction_rows(dataset: Dataset) -> ExtractionRows:
    """All rows of `dataset` (train, val, test), raw pixels, labels and split names."""
    parts = [getattr(dataset, name) for name in SPLITS]
    x = np.concatenate([part.x for part in parts])
    labels = np.concatenate(
        [np.full(len(part), NO_LABEL, np.int64) if part.y is None else part.y for part in parts]
    )
    split = np.concatenate(
        [np.full(len(part), name) for name, part in zip(SPLITS, parts, strict=True)]
    )
    raw = dataset.raw(x) if dataset.is_vectors else raw_pixels(x, dataset.raw_max)
    return ExtractionRows(raw, labels, split)


# --- the output file ------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingTable:
    """An extraction output: one row per example, and the metadata that made it."""

    embeddings: np.ndarray  # (N, D) float32
    ids: np.ndarray  # (N,) int64: the row's position in train, val, test order
    labels: np.ndarray  # (N,) int64, NO_LABEL when unlabelled
    split: np.ndarray  # (N,) str
    metadata: dict  # dataset (load_dataset arguments), model, backend, created
    scores: np.ndarray | None = None  # (N,) float32 reconstruction_error, with --score

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and labels of one split ("train", "val", "test")."""
        mask = self.split == name
        return self.embeddings[mask], self.labels[mask]


def _atomic_write(path: Path, write) -> None:
    """Call `write(temporary_path)`, then rename the finished file onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_embeddings(path: Path, table: EmbeddingTable) -> None:
    """Write `table` atomically as `.npz` (arrays + JSON metadata) or `.parquet`."""
    if path.suffix == ".npz":

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as handle:
                arrays: dict[str, Any] = {
                    "embeddings": table.embeddings,
                    "ids": table.ids,
                    "labels": table.labels,
                    "split": table.split.astype(str),
                    "metadata": np.array(json.dumps(table.metadata)),
                }
                if table.scores is not None:
                    arrays["reconstruction_error"] = table.scores
                np.savez(handle, **arrays)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = table.embeddings.shape[1]
        columns = {
            "id": pa.array(table.ids),
            "split": pa.array(table.split.astype(str)),
            "label": pa.array(table.labels),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(table.embeddings.reshape(-1)), dim
            ),
        }
        if table.scores is not None:
            columns["reconstruction_error"] = pa.array(table.scores)
        arrow = pa.table(columns).replace_schema_metadata({"aet": json.dumps(table.metadata)})

        def write(temporary: Path) -> None:
            pq.write_table(arrow, temporary)

    _atomic_write(path, write)


def read_embeddings(path: str | os.PathLike) -> EmbeddingTable:
    """Read an `aet embed` output (`.npz` or `.parquet`); errors name the file and the fault."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ExtractionError(
            f"{path}: expected an aet embed output ending in {' or '.join(FORMATS)}"
        )
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                missing = {"embeddings", "ids", "labels", "split", "metadata"} - set(archive.files)
                if missing:
                    raise ExtractionError(
                        f"{path}: missing arrays {sorted(missing)}; found {archive.files}"
                    )
                table = EmbeddingTable(
                    archive["embeddings"],
                    archive["ids"],
                    archive["labels"],
                    archive["split"],
                    json.loads(str(archive["metadata"])),
                    archive["reconstruction_error"]
                    if "reconstruction_error" in archive.files
                    else None,
                )
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            arrow = pq.read_table(path)
            metadata = (arrow.schema.metadata or {}).get(b"aet")
            if metadata is None:
                raise ExtractionError(f"{path}: no 'aet' schema metadata; not an aet embed output")
            embedding = arrow.column("embedding").combine_chunks()
            if not pa.types.is_fixed_size_list(embedding.type):
                raise ExtractionError(
                    f"{path}: column 'embedding': expected fixed-size lists, got {embedding.type}"
                )
            flat = embedding.flatten().to_numpy(zero_copy_only=False)
            table = EmbeddingTable(
                flat.reshape(len(arrow), embedding.type.list_size),
                arrow.column("id").to_numpy(),
                arrow.column("label").to_numpy(),
                arrow.column("split").to_numpy(zero_copy_only=False).astype(str),
                json.loads(metadata),
                arrow.column("reconstruction_error").to_numpy()
                if "reconstruction_error" in arrow.column_names
                else None,
            )
    except FileNotFoundError:
        raise ExtractionError(f"{path}: no such file; run aet embed first") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ExtractionError(f"{path}: not a readable aet embed output ({exc})") from exc
    rows = len(table.ids)
    if table.embeddings.ndim != 2 or any(
        len(a) != rows for a in (table.embeddings, table.labels, table.split)
    ):
        raise ExtractionError(
            f"{path}: columns differ in length or shape: embeddings "
            f"{table.embeddings.shape}, ids {rows}, labels {len(table.labels)}, "
            f"split {len(table.split)}"
        )
    return table


# --- resumable shards ----------------------------------------------------------------------


class ShardStore:
    """`<output>.shards/`: a manifest naming the job, and one `.npz` per finished shard.

    A shard counts as finished only if it loads and holds the expected ids and a finite
    float32 `(rows, embedding_dim)` array; anything else is deleted and embedded again.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = folder
        self.manifest = json.loads(json.dumps(manifest))  # as read back: tuples become lists
        self.rows = manifest["rows"]
        self.shard_size = manifest["shard_size"]
        # with --score each row carries its score as one more column
        self.embedding_dim = manifest["model"]["embedding_dim"] + int(manifest["score"])

    def open(self) -> None:
        """Create the folder, or check that the job it holds is this one."""
        manifest_path = self.folder / MANIFEST
        if manifest_path.exists():
            try:
                previous = json.loads(manifest_path.read_text())
            except (OSError, ValueError) as exc:
                raise ExtractionError(
                    f"{manifest_path}: unreadable manifest ({exc}); delete "
                    f"{self.folder} to start afresh"
                ) from exc
            for key, value in self.manifest.items():
                if previous.get(key) != value:
                    raise ExtractionError(
                        f"{manifest_path}: field {key!r}: this job has {value!r}, the unfinished "
                        f"one has {previous.get(key)!r}; finish it with the same arguments or "
                        f"delete {self.folder}"
                    )
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(manifest_path, lambda t: t.write_text(json.dumps(self.manifest, indent=2)))

    @property
    def count(self) -> int:
        return -(-self.rows // self.shard_size)

    def bounds(self, index: int) -> tuple[int, int]:
        """First and one-past-last row of shard `index`."""
        return index * self.shard_size, min((index + 1) * self.shard_size, self.rows)

    def path(self, index: int) -> Path:
        return self.folder / f"shard-{index:05d}.npz"

    def load(self, index: int) -> np.ndarray | None:
        """The embeddings of a valid finished shard, or None (an invalid file is removed)."""
        path = self.path(index)
        if not path.exists():
            return None
        start, stop = self.bounds(index)
        try:
            with np.load(path, allow_pickle=False) as archive:
                ids, embeddings = archive["ids"], archive["embeddings"]
            valid = (
                np.array_equal(ids, np.arange(start, stop))
                and embeddings.dtype == np.float32
                and embeddings.shape == (stop - start, self.embedding_dim)
                and bool(np.isfinite(embeddings).all())
            )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            valid = False
        if not valid:
            path.unlink()
            return None
        return embeddings

    def save(self, index: int, embeddings: np.ndarray) -> None:
        """Write shard `index` atomically."""
        start, stop = self.bounds(index)
        ids = np.arange(start, stop, dtype=np.int64)

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as handle:
                np.savez(handle, ids=ids, embeddings=embeddings)

        _atomic_write(self.path(index), write)

    def remove(self) -> None:
        shutil.rmtree(self.folder)


@dataclass(frozen=True)
class ExtractionSummary:
    """What one `aet embed` run did."""

    output: Path
    rows: int
    embedded_rows: int  # rows embedded by this run (the rest came from finished shards)
    seconds: float  # embedding time of this run, loading and merging excluded
    backend: str

    @property
    def rows_per_second(self) -> float:
        return self.embedded_rows / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        reused = self.rows - self.embedded_rows
        return (
            f"embedded {self.embedded_rows} rows in {self.seconds:.2f} s "
            f"({self.rows_per_second:,.0f} rows/s, {self.backend})"
            + (f", {reused} rows from finished shards" if reused else "")
            + f"; wrote {self.rows} rows to {self.output}"
        )


def extract(
    config: EmbedConfig, backend: EmbeddingBackend, dataset: Dataset | None = None
) -> ExtractionSummary:
    """Run the extraction job of `config` on an open `backend`; `dataset` saves reloading it."""
    from tqdm import tqdm

    output = config.output
    if output.exists() and not config.overwrite:
        raise ExtractionError(f"{output}: already exists; pass --overwrite to replace it")
    if dataset is None:
        dataset = load_dataset(**config.dataset_args())
    rows = extraction_rows(dataset)
    model = backend.model
    check_model_fits(model, dataset)
    manifest = {
        "dataset": config.dataset_args(),
        "model": dataclasses.asdict(model),
        "rows": len(rows),
        "shard_size": config.shard_size,
        "score": config.score,
    }
    store = ShardStore(output.with_name(output.name + ".shards"), manifest)
    store.open()
    shards = [store.load(index) for index in range(store.count)]
    pending = [index for index, shard in enumerate(shards) if shard is None]
    pending_rows = sum(stop - start for start, stop in map(store.bounds, pending))

    started = time.perf_counter()
    with tqdm(
        total=len(rows),
        initial=len(rows) - pending_rows,
        unit="row",
        desc="embed",
        disable=not config.progress,
    ) as progress:
        pixels = (
            np.concatenate([rows.pixels[slice(*store.bounds(i))] for i in pending])
            if pending
            else rows.pixels[:0]
        )
        buffered: list[np.ndarray] = []
        waiting = iter(pending)
        index = next(waiting, None)
        returned = 0
        for embeddings in backend.embed_rows(pixels, config.batch_size):
            buffered.append(embeddings)
            returned += len(embeddings)
            progress.update(len(embeddings))
            while index is not None:
                start, stop = store.bounds(index)
                if sum(map(len, buffered)) < stop - start:
                    break
                joined = np.concatenate(buffered)
                shards[index] = np.ascontiguousarray(joined[: stop - start], dtype=np.float32)
                store.save(index, shards[index])
                buffered = [joined[stop - start :]]
                index = next(waiting, None)
    seconds = time.perf_counter() - started
    if returned != pending_rows:
        raise ExtractionError(
            f"backend {backend.label}: expected {pending_rows} embeddings, "
            f"got {returned}; finished shards are kept, run again to resume"
        )

    metadata = {
        "dataset": config.dataset_args(),
        "model": dataclasses.asdict(model),
        "backend": backend.label,
        "created": datetime.now(UTC).isoformat(),
    }
    finished = [shard for shard in shards if shard is not None]
    assert len(finished) == len(shards)  # every pending shard was filled above
    packed = np.concatenate(finished)
    table = EmbeddingTable(
        packed[:, : model.embedding_dim],
        np.arange(len(rows), dtype=np.int64),
        rows.labels,
        rows.split,
        metadata,
        packed[:, model.embedding_dim] if config.score else None,
    )
    write_embeddings(output, table)
    store.remove()
    return ExtractionSummary(output, len(rows), pending_rows, seconds, backend.label)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EmbedConfig)


def run(args: argparse.Namespace) -> int:
    from aet.clients.backends import open_backend

    config = config_from_args(EmbedConfig, args)
    try:
        with open_backend(config) as backend:
            summary = extract(config, backend)
    except KeyboardInterrupt:
        print(
            f"aet embed: interrupted; finished shards are kept in {config.output}.shards, "
            f"run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(summary.line())
    return 0
