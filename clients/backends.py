"""Where `aet embed` runs the encoder: a gRPC server, onnxruntime in-process, or Ray Data.

The in-process backends (`LocalBackend`, `ServerBackend`) offer `model` (which encoder answers)
and `embed_rows(pixels, batch_size)`, an iterator of the outputs of consecutive row blocks in
order; `clients.extract` feeds them shard by shard. `RayBackend` runs the whole job as one Ray
Data pipeline instead: read on the workers, embed in onnxruntime actors that
receive the ONNX bytes and the model card (no shared filesystem needed), write on the workers.
The local backend and the Ray actors run `aet.Encoder`, on the same
`aet.runtime.EncoderSession` the server runs, so all three give the same embeddings. Every
block is the graph's named outputs (`{"embedding": ...}`); opened with `score=True`, each
block also holds each row's novelty score (`reconstruction_error`) and, when the model has
calibration scores, its conformal p-value (`p_value`, `p_value_record`), which the Ray actors
write as columns of their own.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aet.conformal import P_VALUE_NAME
from aet.encoder import Encoder
from aet.errors import UserError
from aet.repository import (
    SCORE_NAME,
    ModelCard,
    ModelVersion,
    find_model_version,
    read_calibration,
)
from aet.runtime import DEVICES, Outputs

if TYPE_CHECKING:
    from aet.training.dataspec import DataSpec

log = logging.getLogger(__name__)


class BackendError(UserError):
    """A backend could not start: no such model folder, no usable version, Ray failed."""


@dataclass(frozen=True)
class ModelIdentity:
    """The encoder version that computes the embeddings (recorded in outputs and manifests)."""

    name: str
    version: int
    sha256: str
    embedding_dim: int
    input_shape: tuple[int, ...]  # (C, H, W)
    max_value: float | None  # the raw pixel value the graph maps to 1.0; None for vectors
    class_labels: tuple[str, ...] = ()  # a classifier's class names by output column, else ()
    output_name: str = "embedding"  # the graph's output (a classifier's: probabilities)


def _identity(found: ModelVersion) -> ModelIdentity:
    card = found.usable_card
    return ModelIdentity(
        card.name,
        card.version,
        card.sha256,
        card.output.embedding_dim,
        tuple(card.input.shape),
        None if card.input.value_range is None else card.input.value_range[1],
        card.classifier.labels if card.classifier is not None else (),
        card.output.name,
    )


def _check_score(card: ModelCard, score: bool) -> None:
    """Refuse `--score` for a graph exported before the novelty score existed."""
    if score and card.score is None:
        raise BackendError(
            f"model {card.name} v{card.version}: its graph has no reconstruction_error output "
            f"(exported before the novelty score existed); export it again or drop --score"
        )


def p_value_record(card: dict[str, Any], score: bool) -> dict[str, Any] | None:
    """What a job's `p_value` column means and is computed from (the calibration scores the
    model card references, by file, rows, split and sha256), for the output's metadata and the
    job's manifest; None without `score`, and for a model without calibration scores (an
    export from before p-values), which one warning line names: its score is still written."""
    if not score:
        return None
    spec = card.get("score") or {}
    if spec.get("calibration_file") is None:
        log.warning(
            "model %s v%s has no calibration data (exported before p-values): writing %s "
            "without %s; export it again for p-values",
            card.get("name"),
            card.get("version"),
            SCORE_NAME,
            P_VALUE_NAME,
        )
        return None
    keys = ("calibration_file", "calibration_sha256", "calibration_rows", "calibration_split")
    return {
        "column": P_VALUE_NAME,
        "definition": f"conformal p-value of {SCORE_NAME}: (1 + #{{calibration scores >= "
        f"score}}) / (n + 1); small is unusual",
        **{key: spec[key] for key in keys},
    }


class EmbeddingBackend:
    """What `clients.extract.extract` runs on: `model`, `label` and `embed_rows` (`RayBackend`
    runs the whole job with `plan` and `embed_blocks` instead); a context manager that releases
    the backend's resources on exit."""

    label: str  # for the summary line and the output's metadata
    model: ModelIdentity
    p_value: dict[str, Any] | None = None  # `p_value_record`: None when no p-values are made

    def embed_rows(self, pixels: np.ndarray, batch_size: int) -> Iterator[Outputs]:
        """The named outputs of consecutive blocks of `pixels` (raw range), in order."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release what the backend holds (channel, Ray); the default holds nothing."""


class RayStartTimeout(Exception):
    """A local Ray node did not start within Ray's own startup limits."""


# Ray's startup limits that a busy machine can miss: the raylet must register within 30 s
# (fixed in Ray; a bare Exception) and the GCS server must write its port file within
# `RAY_gcs_server_port_wait_time_s` (default 30 s; a RuntimeError).
_RAY_STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")
GCS_PORT_WAIT_S = "120"  # our default for RAY_gcs_server_port_wait_time_s (a user's value wins)


def _start_local_ray(cpus: int, tries: int = 2) -> None:
    """Start a local Ray with `cpus` CPUs, giving its GCS server 120 s to come up. When it
    still misses one of Ray's startup limits, Ray starts afresh, up to `tries` times."""
    import ray

    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", GCS_PORT_WAIT_S)
    for attempt in range(1, tries + 1):
        try:
            ray.init(
                num_cpus=cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
            return
        except Exception as exc:  # Ray raises a bare Exception for the raylet's limit
            if not any(timeout in str(exc) for timeout in _RAY_STARTUP_TIMEOUTS):
                raise
            ray.shutdown()
            if attempt == tries:
                raise RayStartTimeout(f"{exc} ({tries} tries)") from exc
            log.warning("ray_start_retry", extra={"reason": str(exc)})


class LocalBackend(EmbeddingBackend):
    """onnxruntime in this process, on `exported/<model>[/<version>]`."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        threads: int = 0,
        score: bool = False,
        device: str = "auto",
    ):
        found = find_model_version(model_dir)
        _check_score(found.usable_card, score)
        self.model = _identity(found)
        self._encoder = Encoder.open(found, device, threads)
        self._score = score
        self.p_value = p_value_record(self._encoder.card, score)
        self.label = f"local onnxruntime ({self._encoder.provider})"

    def embed_rows(self, pixels: np.ndarray, batch_size: int) -> Iterator[Outputs]:
        """The outputs of `pixels` (uint8 or float32, raw range) in blocks of `batch_size`."""
        for start in range(0, len(pixels), batch_size):
            rows = pixels[start : start + batch_size]
            yield self._encoder.run(rows, self._score, batch_size, p_value=bool(self.p_value))


class ServerBackend(EmbeddingBackend):
    """An `aet serve` server, or several replicas behind one client, over unary `Embed` calls.

    Up to `in_flight` requests are outstanding at once, so that replicas balanced by the
    client's round_robin policy all work; each request is retried by the client's service
    config on UNAVAILABLE or RESOURCE_EXHAUSTED (another replica answers when one is gone).
    With `score`, p-values are asked of the server (`EmbedOptions.p_value`) when the card it
    describes references calibration scores: it computes them from each row's score with
    `aet.conformal.p_values` on the calibration it loaded and checked, as `aet.Encoder` does,
    so there is one definition and no second copy of the calibration here.
    """

    def __init__(
        self,
        client,
        model: str,
        version: int | None = None,
        in_flight: int = 4,
        score: bool = False,
    ):
        self._client = client
        self._score = score
        description = client.describe(model, version)
        self.model = ModelIdentity(
            description.name,
            description.version,
            description.sha256,
            description.embedding_dim,
            tuple(description.input.shape),
            None if math.isinf(description.input.max_value) else description.input.max_value,
            tuple(description.class_labels),
            description.output.name,
        )
        self.p_value = p_value_record(description.card, score)
        self.label = f"server {client.target}"
        self._in_flight = in_flight
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix="aet-embed")

    def embed_rows(self, pixels: np.ndarray, batch_size: int) -> Iterator[Outputs]:
        """The outputs of `pixels`, at most `batch_size` rows per request (fewer if the
        message limit or the server's `max_request_rows` wants), in order."""
        if len(pixels) == 0:
            return
        name, version = self.model.name, self.model.version
        step = min(batch_size, self._client.rows_per_request(pixels, name, version))
        waiting: deque = deque()
        for start in range(0, len(pixels), step):
            if len(waiting) == self._in_flight:
                yield waiting.popleft().result()
            waiting.append(
                self._pool.submit(self._embed, pixels[start : start + step], name, version)
            )
        while waiting:
            yield waiting.popleft().result()

    def _embed(self, rows: np.ndarray, name: str, version: int) -> Outputs:
        """One request's embeddings, and the novelty scores (and p-values) if asked."""
        if not self._score:
            return {self.model.output_name: self._client.embed(rows, name, version)}
        if self.p_value:
            embeddings, scores, p = self._client.embed_with_p_value(rows, name, version)
            return {self.model.output_name: embeddings, SCORE_NAME: scores, P_VALUE_NAME: p}
        embeddings, scores = self._client.embed_with_score(rows, name, version)
        return {self.model.output_name: embeddings, SCORE_NAME: scores}

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._client.close()


def actor_device(device: str, cluster_gpus: float) -> tuple[str, int]:
    """The device Ray actors run the encoder on, and the GPUs each one reserves.

    "cuda" reserves one GPU per actor (refused on a cluster without GPUs); "auto" does so when
    the cluster has GPUs; "cpu" reserves none.
    """
    if device not in DEVICES:
        raise BackendError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and cluster_gpus < 1:
        raise BackendError(f"device: cuda needs GPUs in the Ray cluster; got {cluster_gpus:g} GPUs")
    if device == "cuda" or (device == "auto" and cluster_gpus >= 1):
        return "cuda", 1
    return "cpu", 0


class EncoderActor:
    """A Ray Data `map_batches` worker: one `aet.Encoder` on one thread, `batch_size` rows
    per run, opened from the shipped ONNX bytes and model card (`Encoder.from_bytes`: no
    model folder on the worker's disk); with `calibration` (shipped too) it writes p-values."""

    def __init__(
        self,
        onnx: bytes,
        card: ModelCard,
        device: str,
        batch_size: int,
        score: bool = False,
        calibration: np.ndarray | None = None,
    ):
        self._batch_size = batch_size
        self._score = score
        self._p_value = calibration is not None
        self._encoder = Encoder.from_bytes(onnx, card, device, threads=1, calibration=calibration)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        outputs = self._encoder.run(
            batch["pixels"], self._score, self._batch_size, p_value=self._p_value
        )
        embeddings = outputs[self._encoder.card["output"]["name"]]
        columns = {
            "id": batch["id"],
            "split": batch["split"].astype(str),
            "label": batch["label"],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(embeddings).reshape(-1)), embeddings.shape[1]
            ),
        }
        for name in (SCORE_NAME, P_VALUE_NAME):
            if name in outputs:
                columns[name] = pa.array(outputs[name])
        return pa.table(columns)


@dataclass(frozen=True)
class PlanShape:
    """What the job's process learns of a plan made on a worker: its size and its images."""

    name: str
    rows: int
    image_shape: tuple[int, ...]
    raw_max: float
    is_vectors: bool  # a table of features: no raw value range


def _plan_on_worker(dataset: DataSpec):
    """Ray task: the job's `RowPlan`, kept in the object store, and its `PlanShape`."""
    from aet.clients.rows import plan_rows

    plan = plan_rows(dataset)
    shape = PlanShape(plan.name, len(plan), plan.image_shape, plan.raw_max, plan.is_vectors)
    return shape, plan


def _read_blocks(bounds: dict[str, np.ndarray], plan: list) -> dict[str, np.ndarray]:
    """Ray Data: the rows (id, label, split, pixels) of the blocks [start, stop) in `bounds`."""
    import ray

    rows = ray.get(plan[0])
    blocks = [
        rows.block(int(a), int(b)) for a, b in zip(bounds["start"], bounds["stop"], strict=True)
    ]
    return {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}


class RayBackend(EmbeddingBackend):
    """The job as one Ray Data pipeline, with `workers` onnxruntime actors.

    Starts a local Ray (`workers` + 1 CPUs: one for the reading and writing tasks, no
    dashboard) unless `address` names a cluster to join. The output folder must be writable
    by every worker (one machine, a shared filesystem, or a URI pyarrow can write). Only a Ray
    this backend started is shut down by `close()`.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        workers: int,
        address: str | None = None,
        device: str = "auto",
        score: bool = False,
    ):
        import ray

        found = find_model_version(model_dir)
        _check_score(found.usable_card, score)  # before Ray starts
        self.model = _identity(found)
        self._score = score
        self._card = found.usable_card
        self.p_value = p_value_record(self._card.to_dict(), score)
        self._calibration = read_calibration(found.path, self._card) if self.p_value else None
        self._onnx = found.verified_bytes()
        self._workers = workers
        self._plan = None
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            try:
                if address is None:
                    _start_local_ray(workers + 1)
                else:
                    ray.init(address=address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError, RayStartTimeout) as exc:
                raise BackendError(
                    f"ray: cannot {'join ' + address if address else 'start'}: {exc}"
                ) from exc
        try:
            self._device, self._gpus = actor_device(device, ray.cluster_resources().get("GPU", 0))
        except BackendError:
            self.close()
            raise
        self.label = f"ray ({workers} actors, {self._device})"

    def plan(self, dataset: DataSpec) -> PlanShape:
        """Plan the job's rows in a Ray task; the plan stays in the object store."""
        import ray

        task = ray.remote(num_returns=2, num_cpus=1)(_plan_on_worker)
        refs: Any = task.remote(dataset)  # num_returns=2: two ObjectRefs
        shape, self._plan = refs
        try:
            return ray.get(shape)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserError):  # a bad data set: its own message
                raise exc.cause from None
            raise

    def embed_blocks(
        self, blocks: list[tuple[int, int]], batch_size: int, output: Path, progress: bool
    ) -> None:
        """Read, embed and write the rows [start, stop) of each block into `output`.

        Files hold at most a block's worth of rows, so that a restart redoes little.
        """
        import ray

        if not blocks:
            return
        block_rows = max(stop - start for start, stop in blocks)
        ray.data.DataContext.get_current().enable_progress_bars = progress
        bounds = [{"start": start, "stop": stop} for start, stop in blocks]
        rows = ray.data.from_items(bounds, override_num_blocks=len(bounds)).map_batches(
            # Ray types `fn` as taking the batch alone; fn_kwargs supplies the plan.
            _read_blocks,  # type: ignore[arg-type]
            fn_kwargs={"plan": [self._plan]},
            batch_size=1,
            batch_format="numpy",
        )
        embedded = rows.map_batches(
            EncoderActor,
            fn_constructor_kwargs={
                "onnx": self._onnx,
                "card": self._card,
                "device": self._device,
                "batch_size": batch_size,
                "score": self._score,
                "calibration": self._calibration,
            },
            batch_size=None,  # a whole block per call: onnxruntime runs batch_size rows at a time
            batch_format="numpy",
            num_cpus=1,
            num_gpus=self._gpus,
            compute=ray.data.ActorPoolStrategy(size=min(self._workers, len(blocks))),
        )
        embedded.write_parquet(str(output.resolve()), max_rows_per_file=block_rows)

    def close(self) -> None:
        import ray

        if self._started_ray:
            ray.shutdown()


def open_backend(config) -> EmbeddingBackend:
    """The backend an `EmbedConfig` asks for (`--server`, `--local` or `--ray`)."""
    if config.local is not None:
        return LocalBackend(config.local, score=config.score, device=config.device)
    if config.ray is not None:
        return RayBackend(
            config.ray, config.workers, config.ray_address, config.device, score=config.score
        )
    from aet.clients.client import EmbeddingClient

    client = EmbeddingClient(
        config.server,
        timeout=config.timeout,
        token=os.environ.get(config.token_env) or None,
        root_cert=config.root_cert,
        client_cert=config.client_cert,
        client_key=config.client_key,
    )
    try:
        return ServerBackend(client, config.model, config.version, score=config.score)
    except BaseException:
        client.close()
        raise
