"""`aet embed`: embeddings of every row of a data set, through a server, onnxruntime or Ray.

All rows of train, val and test are embedded, in that order, with a `split` column, so that
`aet probe` can train on the fit part and score on the test part. Where each row comes from is
planned from the labels alone (`clients.rows`); the pixels are read block by block.

In process (`--server`, `--local`) the job runs in shards of `shard_size` rows written to
`<output>.shards/` (`clients.shards`): each shard is written atomically, and a restarted job
validates and skips the finished ones (whatever backend wrote them: the backends give identical
embeddings). When every shard is there they are streamed into the output one at a time
(`clients.embeddings`: `.npz` or `.parquet`, written atomically), so no more than a shard is
held in memory, and the shard folder is removed.

On Ray (`--ray`) the job is one Ray Data pipeline whose rows never pass through this process:
the workers read blocks of `shard_size` rows, onnxruntime actors embed them, and the workers
write them as Parquet files into the output folder, next to a manifest naming the job. A
restarted job keeps the blocks whose rows are all in readable files and runs the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from aet.clients.embeddings import (
    FORMATS,
    MANIFEST,
    OPTIONAL_FIELDS,
    ExtractionError,
    TableParts,
    write_embeddings,
)
from aet.clients.rows import NO_LABEL, SPLITS, RowPlan, plan_rows, raw_pixels
from aet.clients.shards import PartsFolder, ShardStore, input_digest
from aet.config import ConfigError, add_config_arguments, config_from_args
from aet.conformal import P_VALUE_NAME
from aet.repository import SCORE_NAME
from aet.training.data import Dataset
from aet.training.dataspec import DataSpec, resolve_data

if TYPE_CHECKING:  # the backends import onnxruntime (and Ray): only when a job runs
    from aet.clients.backends import EmbeddingBackend, ModelIdentity, PlanShape, RayBackend

EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


@dataclass
class EmbedConfig:
    """`aet embed`: which data, which model through which backend, where the output goes."""

    data: DataSpec = field(default_factory=DataSpec)
    score: bool = field(
        default=False,
        metadata={
            "help": "also write each row's novelty score, reconstruction_error (runs the "
            "decoder too), and its conformal p-value, p_value, against the model's calibration "
            "scores (left out, with a warning, for a model exported without them)"
        },
    )
    server: str | None = field(
        default=None,
        metadata={
            "help": "backend: embed through the gRPC server at host:port, or through replicas "
            "balanced round-robin: ip:port,ip:port,... or one DNS name (needs --model)"
        },
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
            "per worker; writes a folder of Parquet files"
        },
    )
    ray_address: str | None = field(
        default=None,
        metadata={"help": "Ray cluster to join (default: start a local Ray with --workers CPUs)"},
    )
    workers: int = field(default=2, metadata={"help": "Ray actors, one CPU (or GPU) each"})
    device: str = field(
        default="auto",
        metadata={
            "help": "--local and --ray: where the encoder runs: cuda (Ray: one GPU per actor), "
            "cpu, or auto (cuda when a GPU is usable; the server chooses its own)",
            "choices": ["auto", "cpu", "cuda"],
        },
    )
    batch_size: int = field(
        default=512,
        metadata={
            "help": "rows per request or onnxruntime run (requests are split further to fit the "
            "message limit)"
        },
    )
    shard_size: int = field(
        default=4096, metadata={"help": "rows per resumable shard (Ray: per block)"}
    )
    output: Path | None = field(
        default=None,
        metadata={
            "help": "output file, .npz or .parquet; with --ray a folder ending in .parquet "
            "(default: extracted/<dataset>.npz, with --ray extracted/<dataset>.parquet)"
        },
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
        if self.server is not None and self.device != "auto":
            raise ConfigError(
                f"device: only for --local or --ray (the server chooses its own); "
                f"got --device {self.device}"
            )
        if self.server is None and (self.model or self.version):
            raise ConfigError(
                "model, version: only for --server; --local and --ray take the "
                f"model folder; got model={self.model} version={self.version}"
            )
        for name in ("workers", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer; got {getattr(self, name)}")
        if self.ray is not None and self.output_path.suffix != ".parquet":
            raise ConfigError(
                f"output: --ray writes a folder of Parquet files; expected a name ending in "
                f".parquet; got {self.output}"
            )
        if self.output_path.suffix not in FORMATS:
            raise ConfigError(
                f"output: expected a file ending in {' or '.join(FORMATS)}; got {self.output}"
            )

    def default_output(self) -> Path:
        """extracted/<dataset>.npz, or with --ray extracted/<dataset>.parquet."""
        suffix = ".npz" if self.ray is None else ".parquet"
        return Path("extracted") / f"{self.data.name}{suffix}"

    @property
    def output_path(self) -> Path:
        """`output`, or its default for the data set (`default_output`)."""
        return self.default_output() if self.output is None else self.output

    def with_model_data(self) -> Self:
        """With --local or --ray: the unset data fields (`DataSpec`) taken from the model's
        card, so the rows have the shape and split the model was pretrained on; given ones win."""
        model_dir = self.local or self.ray
        if model_dir is None:
            return self
        data, _ = resolve_data(self.data, model_dir, allow_mismatch=True)
        return dataclasses.replace(self, data=data)


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


def check_model_fits(model: ModelIdentity, dataset: Dataset | RowPlan | PlanShape) -> float:
    """The factor that takes the data set's raw pixels into the encoder's range (1.0 when
    they match; vectors: 1.0, the graph standardises them); `ExtractionError` unless the
    encoder takes rows of the data set's shape and kind (`dataset`: anything with name,
    image_shape, raw_max and is_vectors). Both pixel ranges are known, [0, raw_max] and the
    card's [0, max], so images of another range (uint8 0..255, float 0..1) are rescaled."""
    expected_max = None if dataset.is_vectors else dataset.raw_max
    if tuple(model.input_shape) != tuple(dataset.image_shape) or (
        (model.max_value is None) != (expected_max is None)
    ):
        raise ExtractionError(
            f"model {model.name} v{model.version}: expected rows of shape "
            f"{tuple(model.input_shape)} with values up to {model.max_value}; data set "
            f"{dataset.name} has shape {tuple(dataset.image_shape)} with values up to "
            f"{expected_max}"
        )
    if model.max_value is None or expected_max is None or model.max_value == expected_max:
        return 1.0
    return model.max_value / expected_max


def rescaled(pixels: np.ndarray, scale: float) -> np.ndarray:
    """`pixels` times `scale` (float32), or unchanged when `scale` is 1."""
    return pixels if scale == 1.0 else pixels.astype(np.float32) * np.float32(scale)


def _range_note(model: ModelIdentity, plan: RowPlan, scale: float) -> str:
    """What a summary says about rescaled pixels ("" when none were)."""
    if scale == 1.0:
        return ""
    return (
        f"pixels of {plan.name} rescaled from 0..{plan.raw_max:g} to the model's "
        f"0..{model.max_value:g}"
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


@dataclass(frozen=True)
class ExtractionSummary:
    """What one `aet embed` run did."""

    output: Path
    rows: int
    embedded_rows: int  # rows embedded by this run (the rest came from finished shards)
    seconds: float  # embedding time of this run, loading and merging excluded
    backend: str
    changed_rows: int = 0  # rows of finished shards embedded again: their input had changed
    source: str = ""  # the data read (file or bundled data set), named when it changed
    note: str = ""  # e.g. that the pixels were rescaled into the model's range

    @property
    def rows_per_second(self) -> float:
        return self.embedded_rows / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        reused = self.rows - self.embedded_rows
        return (
            f"embedded {self.embedded_rows} rows in {self.seconds:.2f} s "
            f"({self.rows_per_second:,.0f} rows/s, {self.backend})"
            + (f", {reused} rows from finished shards" if reused else "")
            + (
                f", {self.changed_rows} rows embedded again: {self.source} changed since "
                f"their shards were written"
                if self.changed_rows
                else ""
            )
            + (f"; {self.note}" if self.note else "")
            + f"; wrote {self.rows} rows to {self.output}"
        )


def _job_manifest(config: EmbedConfig, backend: EmbeddingBackend, rows: int) -> dict[str, Any]:
    """What names a job: a restarted one must match it to reuse finished shards or blocks
    (`p_value`: what its p-values come from, so shards with and without them never mix)."""
    return {
        "dataset": config.data.record(),
        "model": dataclasses.asdict(backend.model),
        "rows": rows,
        "shard_size": config.shard_size,
        "score": config.score,
        "p_value": backend.p_value,
    }


def _source(config: EmbedConfig) -> str:
    """What the job reads, for messages: the data file or folder, else the data set's name."""
    path = config.data.data_path
    return str(path) if path is not None else f"data set {config.data.name}"


def _metadata(config: EmbedConfig, backend: EmbeddingBackend) -> dict[str, Any]:
    return {
        "dataset": config.data.record(),
        "model": dataclasses.asdict(backend.model),
        "backend": backend.label,
        "created": datetime.now(UTC).isoformat(),
        "p_value": backend.p_value,  # what the p_value column means; None: no such column
    }


def extract(
    config: EmbedConfig, backend: EmbeddingBackend, plan: RowPlan | None = None
) -> ExtractionSummary:
    """Run the extraction job of `config` on an open `backend`; `plan` saves planning again."""
    output = config.output_path
    if _is_complete(output) and not config.overwrite:
        raise ExtractionError(f"{output}: already exists; pass --overwrite to replace it")
    from aet.clients.backends import RayBackend

    if isinstance(backend, RayBackend):  # runs the whole job itself
        return _extract_on_ray(config, backend)
    return _extract_in_process(config, backend, plan or plan_rows(config.data))


def _is_complete(output: Path) -> bool:
    """Whether `output` is a finished job (a file, or a folder whose manifest says so)."""
    if not output.is_dir():
        return output.exists()
    try:
        return bool(json.loads((output / MANIFEST).read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _extract_in_process(
    config: EmbedConfig, backend: EmbeddingBackend, plan: RowPlan
) -> ExtractionSummary:
    """Shards of rows read here, embedded by `backend`, saved, then merged into the output."""
    from tqdm import tqdm

    output = config.output_path
    scale = check_model_fits(backend.model, plan)
    model = backend.model
    shapes: dict[str, tuple[int, ...]] = {model.output_name: (model.embedding_dim,)}
    if config.score:
        shapes[SCORE_NAME] = ()
    if backend.p_value:
        shapes[P_VALUE_NAME] = ()
    store = ShardStore(
        output.with_name(output.name + ".shards"), _job_manifest(config, backend, len(plan)), shapes
    )
    store.open()
    pending = [
        index
        for index in range(store.count)
        if not (
            store.path(index).exists()  # rows are read again only for a finished shard
            and store.is_finished(index, input_digest(plan.pixels(*store.bounds(index))))
        )
    ]
    pending_rows = sum(stop - start for start, stop in map(store.bounds, pending))
    changed_rows = sum(stop - start for start, stop in map(store.bounds, store.stale))

    started = time.perf_counter()
    with tqdm(
        total=len(plan),
        initial=len(plan) - pending_rows,
        unit="row",
        desc="embed",
        disable=not config.progress,
    ) as progress:
        for index in pending:  # each shard goes to its file, none stays here
            start, stop = store.bounds(index)
            parts, pixels = [], plan.pixels(start, stop)
            for outputs in backend.embed_rows(rescaled(pixels, scale), config.batch_size):
                parts.append(outputs)
                progress.update(len(outputs[model.output_name]))
            shard = {
                name: np.ascontiguousarray(
                    np.concatenate([part[name] for part in parts]) if parts else np.zeros(0),
                    dtype=np.float32,
                )
                for name in store.shapes
            }
            embedded = len(shard[model.output_name])
            if embedded != stop - start:
                raise ExtractionError(
                    f"backend {backend.label}: expected {stop - start} embeddings for rows "
                    f"{start}..{stop - 1}, got {embedded}; finished shards are kept, "
                    f"run again to resume"
                )
            store.save(index, shard, input_digest(pixels))
    seconds = time.perf_counter() - started

    write_embeddings(output, _merged(store, plan, model, _metadata(config, backend)))
    store.remove()
    return ExtractionSummary(
        output,
        len(plan),
        pending_rows,
        seconds,
        backend.label,
        changed_rows,
        _source(config),
        _range_note(model, plan, scale),
    )


def _merged(
    store: ShardStore, plan: RowPlan, model: ModelIdentity, metadata: dict[str, Any]
) -> TableParts:
    """The output table, read shard by shard from `store` when written: embeddings (and
    scores, p-values) from the shard files, ids, labels and splits from `plan`."""
    outputs = {"embeddings": model.output_name, **OPTIONAL_FIELDS}

    def read(start: int, stop: int, field: str) -> np.ndarray:
        ids = np.arange(start, stop, dtype=np.int64)
        index = start // store.block_rows
        match field:
            case "embeddings" | "scores" | "p_values":
                return store.read(index, outputs[field])
            case "ids":
                return ids
            case "labels":
                return plan.labels[start:stop]
            case "split":
                return plan.split_of(ids)
        raise ValueError(f"no field {field!r} in an extraction table")

    bounds = [store.bounds(index) for index in range(store.count)]
    present = frozenset(field for field, name in OPTIONAL_FIELDS.items() if name in store.shapes)
    return TableParts(metadata, bounds, read, present)


def _extract_on_ray(config: EmbedConfig, backend: RayBackend) -> ExtractionSummary:
    """One Ray Data pipeline: read and write on the workers, embed in the actors."""
    plan = backend.plan(config.data)  # planned on a worker; only its shape comes here
    if check_model_fits(backend.model, plan) != 1.0:
        raise ExtractionError(
            f"model {backend.model.name}: expects values up to {backend.model.max_value}, data "
            f"set {plan.name} has values up to {plan.raw_max}; --ray does not rescale them, "
            f"--local and --server do"
        )
    folder = PartsFolder(config.output_path, _job_manifest(config, backend, plan.rows))
    folder.open(overwrite=config.overwrite)
    pending = folder.pending_blocks()
    blocks = [folder.bounds(index) for index in pending]
    started = time.perf_counter()
    backend.embed_blocks(blocks, config.batch_size, config.output_path, progress=config.progress)
    seconds = time.perf_counter() - started
    folder.finish(_metadata(config, backend))
    embedded = sum(stop - start for start, stop in blocks)
    return ExtractionSummary(config.output_path, plan.rows, embedded, seconds, backend.label)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EmbedConfig)


def run_job(command: str, config: EmbedConfig, job: Callable, shards: Path) -> int:
    """`aet <command>`: `job(config, backend)` on the backend of `config`, its summary printed;
    130 when interrupted, the finished shards in `shards` kept for a resume."""
    from aet.clients.backends import open_backend

    try:
        with open_backend(config) as backend:
            print(job(config, backend))
    except KeyboardInterrupt:
        print(
            f"aet {command}: interrupted; finished shards are kept in {shards}.shards, "
            f"run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


def run(args: argparse.Namespace) -> int:
    config = config_from_args(EmbedConfig, args).with_model_data()
    return run_job("embed", config, lambda c, b: extract(c, b).line(), config.output_path)
