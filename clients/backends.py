"""Where `aet embed` runs the encoder: a gRPC server, onnxruntime in-process, or Ray Data.

Every backend offers the same two things: `model` (which encoder answers) and
`embed_rows(pixels, batch_size)`, an iterator of embeddings for consecutive row blocks in
order. A backend opened with `score=True` yields each row's novelty score too, as one more
last column (`server.runtime.EncoderSession.run_scored`'s layout), so the blocks travel and
resume like embeddings; `aet embed --score` takes them apart when it writes the output.
The local and Ray backends run the same `server.runtime.EncoderSession` the server runs, so
all three give the same embeddings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aet.errors import UserError
from aet.server.repository import CARD_FILE, ModelVersion, latest_version, scan_repository
from aet.server.runtime import EncoderSession, RuntimeOptions, resolve_providers


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


def find_model_version(path: str | os.PathLike) -> ModelVersion:
    """The verified version at `exported/<model>/<version>`, or the latest of `exported/<model>`."""
    path = Path(path)
    if (path / CARD_FILE).exists():
        root, name, wanted = path.parent.parent, path.parent.name, path.name
    else:
        root, name, wanted = path.parent, path.name, None
    if not (root / name).is_dir():
        raise BackendError(
            f"model folder {path}: no such folder; expected "
            f"exported/<model> or exported/<model>/<version>"
        )
    versions = [v for v in scan_repository(root) if v.name == name]
    if wanted is not None:
        found = next((v for v in versions if str(v.version) == wanted), None)
        if found is None:
            raise BackendError(
                f"model folder {path}: expected a positive integer version folder, got {wanted!r}"
            )
        if not found.ok:
            raise BackendError(f"model folder {path}: refused: {found.error}")
        return found
    found = latest_version(versions, name)
    if found is None:
        reasons = "; ".join(f"v{v.version}: {v.error}" for v in versions) or "no version folders"
        raise BackendError(f"model folder {path}: no usable version ({reasons})")
    return found


def _identity(found: ModelVersion) -> ModelIdentity:
    card = found.card
    return ModelIdentity(
        card.name,
        card.version,
        card.sha256,
        card.output.embedding_dim,
        tuple(card.input.shape),
        None if card.input.value_range is None else card.input.value_range[1],
    )


def _open_session(found: ModelVersion, threads: int, score: bool = False) -> EncoderSession:
    card = found.card
    assert card is not None  # find_model_version returns usable versions only
    if score and card.score is None:
        raise BackendError(
            f"model {card.name} v{card.version}: its graph has no reconstruction_error output "
            f"(exported before the novelty score existed); export it again or drop --score"
        )
    return EncoderSession(
        found.model_path,
        card.input.name,
        card.output.name,
        tuple(card.input.shape),
        resolve_providers("auto"),
        RuntimeOptions(intra_op_threads=threads),
        score_name=card.score.name if score and card.score is not None else None,
    )


class EmbeddingBackend:
    """What `clients.extract.extract` runs on: `model`, `label` and `embed_rows`; a context
    manager that releases the backend's resources on exit."""

    label: str  # for the summary line and the output's metadata
    model: ModelIdentity

    def embed_rows(self, pixels: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """Embeddings of consecutive blocks of `pixels` (raw range), in order."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release what the backend holds (channel, Ray); the default holds nothing."""


class LocalBackend(EmbeddingBackend):
    """onnxruntime in this process, on `exported/<model>[/<version>]`."""

    def __init__(self, model_dir: str | os.PathLike, threads: int = 0, score: bool = False):
        found = find_model_version(model_dir)
        self.model = _identity(found)
        self._session = _open_session(found, threads, score)
        self._run = self._session.run_scored if score else self._session.run
        self.label = f"local onnxruntime ({self._session.provider})"

    def embed_rows(self, pixels: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """Embeddings of `pixels` (uint8 or float32, raw range) in blocks of `batch_size`."""
        for start in range(0, len(pixels), batch_size):
            yield self._run(pixels[start : start + batch_size].astype(np.float32))


class ServerBackend(EmbeddingBackend):
    """An `aet serve` server, over one `EmbedStream` per job."""

    def __init__(self, client, model: str, version: int | None = None, score: bool = False):
        self._client = client
        self._score = score
        description = client.describe(model, version)
        self.model = ModelIdentity(
            description.name,
            description.version,
            description.sha256,
            description.embedding_dim,
            tuple(description.input.shape),
            description.input.max_value,
        )
        self.label = f"server {client.target}"

    def embed_rows(self, pixels: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """Embeddings of `pixels`, `batch_size` rows per request (fewer if the limit wants).

        The stream has no overall deadline (a job may run for hours); each request still
        fails fast on a server that is down or full, after the client's retries.
        """
        batches = (
            pixels[start : start + batch_size] for start in range(0, len(pixels), batch_size)
        )
        if self._score:
            return self._client.embed_batches(
                batches, self.model.name, self.model.version, with_score=True
            )
        return self._client.embed_batches(batches, self.model.name, self.model.version)

    def close(self) -> None:
        self._client.close()


class EncoderActor:
    """A Ray Data `map_batches` worker: one onnxruntime session, one thread."""

    def __init__(self, model_dir: str, score: bool = False):
        self._session = _open_session(find_model_version(model_dir), 1, score)
        self._run = self._session.run_scored if score else self._session.run

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"row": batch["row"], "embedding": self._run(batch["pixels"].astype(np.float32))}


class RayBackend(EmbeddingBackend):
    """Ray Data `map_batches` with `workers` onnxruntime actors.

    Starts a local Ray (`workers` CPUs, no dashboard) unless `address` names a cluster to join;
    on a cluster, `model_dir` must be readable at the same path on every node. Only a Ray
    this backend started is shut down by `close()`.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        workers: int,
        address: str | None = None,
        score: bool = False,
    ):
        import ray

        found = find_model_version(model_dir)
        _open_session(found, 1, score)  # refuses --score for a graph without it, before Ray
        self.model = _identity(found)
        self._score = score
        self._model_dir = str(found.path.resolve())
        self._workers = workers
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            try:
                if address is None:
                    ray.init(
                        num_cpus=workers,
                        include_dashboard=False,
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                    )
                else:
                    ray.init(address=address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BackendError(
                    f"ray: cannot {'join ' + address if address else 'start'}: {exc}"
                ) from exc
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # shards need rows back in order
        context.enable_progress_bars = False  # the job has its own bar
        self.label = f"ray ({workers} actors)"

    def embed_rows(self, pixels: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """Embeddings of `pixels`, in order, computed by the actor pool."""
        if len(pixels) == 0:
            return
        import pyarrow as pa
        import ray
        from ray.data.extensions import ArrowTensorArray

        rows = np.arange(len(pixels))
        starts = range(0, len(pixels), batch_size)
        blocks = [
            pa.table(
                {
                    "row": rows[i : i + batch_size],
                    "pixels": ArrowTensorArray.from_numpy(pixels[i : i + batch_size]),
                }
            )
            for i in starts
        ]  # one block per batch: the actors share the blocks out
        dataset = ray.data.from_arrow(blocks).map_batches(
            EncoderActor,
            fn_constructor_kwargs={"model_dir": self._model_dir, "score": self._score},
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=self._workers),
        )
        expected = 0
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            if not np.array_equal(batch["row"], rows[expected : expected + len(batch["row"])]):
                raise BackendError(f"ray: rows came back out of order at row {expected}")
            expected += len(batch["row"])
            yield batch["embedding"]

    def close(self) -> None:
        import ray

        if self._started_ray:
            ray.shutdown()


def open_backend(config) -> EmbeddingBackend:
    """The backend an `EmbedConfig` asks for (`--server`, `--local` or `--ray`)."""
    if config.local is not None:
        return LocalBackend(config.local, score=config.score)
    if config.ray is not None:
        return RayBackend(config.ray, config.workers, config.ray_address, score=config.score)
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
