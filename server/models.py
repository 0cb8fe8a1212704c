"""The loaded models: one session and one dynamic batcher per model version, shared by all APIs.

`ModelRegistry` loads what `scan_repository` finds (refused versions are logged and reported,
the others serve), warms every session up before it turns READY, resolves "latest", and lets a
version be loaded or unloaded while serving (hot reload). Both gRPC APIs answer from it.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aet.config import ConfigError
from aet.repository import (
    ModelCard,
    ModelVersion,
    RepositoryError,
    read_calibration,
    scan_repository,
)
from aet.runtime import EncoderSession, ModelLoadError, RuntimeOptions, resolve_providers
from aet.server.batcher import BatchRecord, DynamicBatcher
from aet.server.errors import NotFound, Unavailable, excerpt
from aet.server.validation import RequestSpec

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    """Life cycle of one model version (names match `aet.v1.ModelVersionState.State`)."""

    LOADING = "LOADING"
    READY = "READY"
    DRAINING = "DRAINING"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"  # told to state listeners when a version is gone; never listed


@dataclass(frozen=True)
class BatchingOptions:
    """Dynamic batching limits, the same for every model version (`aet serve`'s flags)."""

    max_batch_size: int = field(
        default=64, metadata={"help": "rows per onnxruntime run; larger requests are split"}
    )
    max_queue_delay_ms: float = field(
        default=2.0,
        metadata={"help": "longest extra wait for requests to join a batch, spent only under load"},
    )
    max_queue_size: int = field(
        default=256,
        metadata={"help": "requests that may wait per model version; beyond it RESOURCE_EXHAUSTED"},
    )
    max_request_rows: int = field(
        default=16384, metadata={"help": "rows one request may carry; beyond it INVALID_ARGUMENT"}
    )
    dynamic_batching: bool = field(
        default=True,
        metadata={
            "help": "merge concurrent requests into shared runs (off: each request runs alone)"
        },
    )
    model_instances: int = field(
        default=1,
        metadata={
            "help": "batches of one model version that may run at once (1 measured best on 2 cores)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_size", "max_request_rows", "model_instances"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if not self.max_queue_delay_ms >= 0:
            delay = self.max_queue_delay_ms
            raise ConfigError(f"max_queue_delay_ms: expected 0 or more, got {delay}")


@dataclass(frozen=True)
class VersionStatus:
    """What the registry knows about one `<model>/<version>` folder."""

    name: str
    version: int
    state: ModelState
    reason: str = ""  # why it is not READY


@dataclass(frozen=True)
class LoadedModel:
    """A model version that has been loaded: its card, session, batchers and request checks."""

    card: ModelCard
    path: Path
    session: EncoderSession
    request_spec: RequestSpec
    # One batcher per output set of the session (`EncoderSession.output_sets`): requests that
    # also want the novelty score queue apart from embedding-only ones, which so never pay
    # for the decoder.
    batcher_for: dict[tuple[str, ...], DynamicBatcher]
    # The validation rows' novelty scores, sorted (sha256-checked `calibration.npy`): the
    # `p_value` output is computed from the score with them; None: the version has none.
    calibration: np.ndarray | None = None

    @property
    def batchers(self) -> tuple[DynamicBatcher, ...]:
        return tuple(self.batcher_for.values())

    @property
    def batcher(self) -> DynamicBatcher:
        """The batcher of embedding-only requests."""
        return self.batcher_for[self.session.embedding_outputs]

    @property
    def scorer(self) -> DynamicBatcher | None:
        """The batcher of requests for the embedding and the novelty score (None: no score)."""
        return next((b for names, b in self.batcher_for.items() if len(names) > 1), None)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> int:
        return self.card.version


StateListener = Callable[[VersionStatus], None]
BatchListener = Callable[[LoadedModel, BatchRecord], None]


class ModelRegistry:
    """Every model version of one repository, by name and version; thread-safe.

    Lookups read plain dicts (atomic under the GIL) and never take the lock; loading and
    unloading replace entries under the lock.
    """

    def __init__(
        self,
        runtime: RuntimeOptions = RuntimeOptions(),
        batching: BatchingOptions = BatchingOptions(),
        providers: list[str] | None = None,
    ) -> None:
        self.runtime = runtime
        self.batching = batching
        self.providers = providers if providers is not None else resolve_providers(runtime.device)
        self._lock = threading.Lock()
        self._ready: dict[tuple[str, int], LoadedModel] = {}
        self._latest: dict[str, LoadedModel] = {}
        # the highest version "latest" has pointed at since the last `reset_latest`: it never
        # steps back below it by itself (a version failing or reappearing is no rollback)
        self._latest_floor: dict[str, int] = {}
        self._statuses: dict[tuple[str, int], VersionStatus] = {}
        self._state_listeners: list[StateListener] = []
        self._batch_listeners: list[BatchListener] = []

    # -- loading ---------------------------------------------------------------------------

    def load_repository(self, root: str | os.PathLike) -> list[VersionStatus]:
        """Load every version under `root`; refused or failing ones are logged and skipped."""
        return [self.load(found) for found in scan_repository(root)]

    def load(
        self, found: ModelVersion, replace: bool = False, drain_timeout: float | None = None
    ) -> VersionStatus:
        """Load one scanned version: session, warm-up, batcher, then READY (or FAILED).

        With `replace`, a loaded version of the same number (whose files changed) keeps
        serving until the new one is READY, then drains within `drain_timeout`; if the new
        one is refused or fails, the old one stops serving too and the version is FAILED.
        """
        key = (found.name, found.version)
        if key in self._ready and not replace:
            raise ValueError(
                f"model {found.name} version {found.version}: already loaded; unload it first"
            )
        if found.error is not None or found.card is None:
            reason = found.error or "no model card"
            log.warning(
                "model_refused",
                extra={"model": found.name, "version": found.version, "reason": reason},
            )
            return self._fail(key, reason, drain_timeout)
        if key not in self._ready:
            self._set_status(VersionStatus(*key, ModelState.LOADING))
        started = time.perf_counter()
        card = found.card
        assert card is not None  # a usable version has its card
        row_shape = tuple(card.input.shape)
        try:
            calibration = read_calibration(found.path, card)
            session = EncoderSession.from_card(
                found.model_path,
                card,
                self.providers,
                self.runtime,
                score=True,
                label=f"{found.name}/{found.version}/{found.model_path.name}",
            )
            session.warm_up(row_shape, (1, self.batching.max_batch_size))
        except (ModelLoadError, RepositoryError) as exc:
            log.error(
                "model_load_failed",
                extra={"model": found.name, "version": found.version, "reason": str(exc)},
            )
            return self._fail(key, str(exc), drain_timeout)
        model = LoadedModel(
            card,
            found.path,
            session,
            RequestSpec.from_card(card, self.batching.max_request_rows),
            {
                names: self._batcher(
                    functools.partial(session.run, outputs=names),
                    "/".join((found.name, str(found.version), *names[1:])),
                )
                for names in session.output_sets
            },
            calibration,
        )
        with self._lock:
            for listener in self._batch_listeners:
                for batcher in model.batchers:
                    batcher.stats.listeners.append(_bind(listener, model))
            replaced = self._ready.get(key)
            self._ready[key] = model
            self._update_latest(found.name)
        if replaced is not None:
            _drain(replaced, drain_timeout)
        log.info(
            "model_ready",
            extra={
                "model": found.name,
                "version": found.version,
                "provider": session.provider,
                "load_ms": round((time.perf_counter() - started) * 1e3, 1),
                "replaced": replaced is not None,
            },
        )
        return self._set_status(VersionStatus(*key, ModelState.READY))

    def _fail(
        self, key: tuple[str, int], reason: str, drain_timeout: float | None
    ) -> VersionStatus:
        """Record `key` as FAILED; a loaded version of that number stops serving and drains."""
        with self._lock:
            stale = self._ready.pop(key, None)
            self._update_latest(key[0])
        if stale is not None:
            _drain(stale, drain_timeout)
        return self._set_status(VersionStatus(*key, ModelState.FAILED, reason))

    def _batcher(self, run: Callable, name: str) -> DynamicBatcher:
        batching = self.batching
        return DynamicBatcher(
            run,
            batching.max_batch_size,
            batching.max_queue_delay_ms / 1e3,
            batching.max_queue_size,
            merge_requests=batching.dynamic_batching,
            instances=batching.model_instances,
            name=name,
        )

    def unload(
        self, name: str, version: int, timeout: float | None = None, step_back: bool = False
    ) -> bool:
        """Stop routing to a version, finish its queued requests, forget it; with `step_back`
        (an explicit load or unload) "latest" may go to an older version at once.

        Returns True if its queue drained within `timeout` seconds.
        """
        with self._lock:
            model = self._ready.pop((name, version), None)
            if model is None:
                raise NotFound(f"model {name!r} version {version}: not loaded")
            if step_back:
                self._latest_floor.pop(name, None)
            self._update_latest(name)
        self._set_status(VersionStatus(name, version, ModelState.DRAINING))
        drained = _drain(model, timeout)
        with self._lock:
            self._statuses.pop((name, version), None)
        log.info("model_unloaded", extra={"model": name, "version": version, "drained": drained})
        self._notify(VersionStatus(name, version, ModelState.UNLOADED))
        return drained

    def forget(self, name: str, version: int) -> None:
        """Drop a version that is not loaded (e.g. FAILED) from the statuses."""
        with self._lock:
            if (name, version) in self._ready:
                raise ValueError(f"model {name} version {version}: loaded; unload it instead")
            status = self._statuses.pop((name, version), None)
        if status is not None:
            log.info("model_forgotten", extra={"model": name, "version": version})
            self._notify(VersionStatus(name, version, ModelState.UNLOADED))

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new requests on every version and finish queued ones; True if all drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        drained = True
        for model in list(self._ready.values()):
            for batcher in model.batchers:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                drained = batcher.close(remaining) and drained
        return drained

    # -- lookups ---------------------------------------------------------------------------

    def lookup(self, name: str, version: int | None = None) -> LoadedModel:
        """The READY model version (the latest when `version` is None).

        Raises `NotFound` for an unknown name or version and `Unavailable` for a version that
        is loading, draining or failed to load.
        """
        model = self._latest.get(name) if version is None else self._ready.get((name, version))
        if model is not None:
            return model
        raise self._missing(name, version)

    def __iter__(self) -> Iterator[LoadedModel]:
        """The READY model versions, by name then version."""
        return iter(sorted(self._ready.values(), key=lambda m: (m.name, m.version)))

    def names(self) -> list[str]:
        """Every model name the repository holds, loaded or not."""
        return sorted({name for name, _ in self._statuses})

    def statuses(self, name: str | None = None) -> list[VersionStatus]:
        """The status of every version (of `name`, if given), by name then version."""
        return sorted(
            (s for s in list(self._statuses.values()) if name in (None, s.name)),
            key=lambda s: (s.name, s.version),
        )

    def latest_version(self, name: str) -> int | None:
        """The version "latest" of `name` points at, or None."""
        model = self._latest.get(name)
        return None if model is None else model.version

    def is_ready(self, name: str) -> bool:
        """True when `name` has a READY version."""
        return name in self._latest

    # -- listeners -------------------------------------------------------------------------

    def add_state_listener(self, listener: StateListener) -> None:
        """Call `listener(status)` on every state change from now on (health, metrics)."""
        self._state_listeners.append(listener)

    def add_batch_listener(self, listener: BatchListener) -> None:
        """Call `listener(model, record)` after every batch of every version, present and future.

        It runs in the batch's thread between batches: keep it quick.
        """
        with self._lock:
            self._batch_listeners.append(listener)
            for model in self._ready.values():
                for batcher in model.batchers:
                    batcher.stats.listeners.append(_bind(listener, model))

    # -- internals -------------------------------------------------------------------------

    def _set_status(self, status: VersionStatus) -> VersionStatus:
        with self._lock:
            self._statuses[(status.name, status.version)] = status
        self._notify(status)
        return status

    def _notify(self, status: VersionStatus) -> None:
        for listener in list(self._state_listeners):
            listener(status)

    def reset_latest(self, name: str) -> None:
        """Let "latest" of `name` go back to an older version (an explicit load or unload)."""
        with self._lock:
            self._latest_floor.pop(name, None)
            self._update_latest(name)

    def _update_latest(self, name: str) -> None:
        """Point "latest" at the highest READY version of `name`, never below one it has
        pointed at since `reset_latest` (lock held)."""
        floor = self._latest_floor.get(name, 0)
        versions = [m for (n, v), m in self._ready.items() if n == name and v >= floor]
        if versions:
            latest = max(versions, key=lambda m: m.version)
            self._latest[name] = latest
            self._latest_floor[name] = latest.version
        else:
            self._latest.pop(name, None)

    def _missing(self, name: str, version: int | None) -> NotFound | Unavailable:
        statuses = self.statuses(name)
        if not statuses:
            return NotFound(f"model: expected one of {self.names()}, got {excerpt(name)}")
        if version is None and any(s.state == ModelState.READY for s in statuses):
            return Unavailable(
                f"model {name!r}: latest was version {self._latest_floor.get(name)}, which is "
                f"not READY now; older versions serve as latest only after the model is "
                f"loaded again (RepositoryModelLoad)"
            )
        if version is None:
            states = ", ".join(
                f"{s.version}: {s.state.value} {s.reason}".rstrip() for s in statuses
            )
            return Unavailable(f"model {name!r}: no version is READY ({states})")
        by_version = {s.version: s for s in statuses}
        if version not in by_version:
            return NotFound(
                f"version: model {name!r} has versions {sorted(by_version)}, got {version}"
            )
        status = by_version[version]
        return Unavailable(
            f"model {name!r} version {version}: {status.state.value}"
            + (f": {status.reason}" if status.reason else "")
        )


def _drain(model: LoadedModel, timeout: float | None) -> bool:
    """Close a version's batchers, finishing queued requests; True if all drained in time."""
    deadline = None if timeout is None else time.monotonic() + timeout
    return all(
        [
            batcher.close(None if deadline is None else max(0.0, deadline - time.monotonic()))
            for batcher in model.batchers
        ]
    )


def _bind(listener: BatchListener, model: LoadedModel) -> Callable[[BatchRecord], None]:
    return lambda record: listener(model, record)
