"""Hot reload: keep the registry in step with the model repository while serving.

`RepositoryReloader.sync` compares what `scan_repository` finds with what the registry holds:
new versions are loaded (warmed up before they turn READY, so "latest" moves only then),
versions whose folder disappeared are unloaded (no new requests; queued ones finish). A version
whose sha256 does not match its card is refused and recorded as FAILED while the versions
already serving keep serving; it is retried once its folder changes (e.g. a copy that was
still missing model.json), and forgotten once its folder is gone. `start_polling(seconds)`
runs `sync` periodically (`aet serve --poll-repository SECONDS`); the KServe
RepositoryModelLoad/Unload RPCs call `load_model` / `unload_model`. A model unloaded explicitly
stays unloaded, polling included, until it is loaded explicitly again.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from aet.repository import ModelVersion, RepositoryError, scan_repository
from aet.server.errors import NotFound, Unavailable, excerpt
from aet.server.models import ModelRegistry, ModelState

log = logging.getLogger(__name__)


class RepositoryReloader:
    """Loads and unloads model versions of `registry` as the repository at `root` changes."""

    def __init__(
        self, registry: ModelRegistry, root: str | os.PathLike, drain_timeout: float | None = 30.0
    ) -> None:
        self.registry = registry
        self.root = Path(root)
        self.drain_timeout = drain_timeout  # seconds an unloaded version's queue may take
        self._lock = threading.Lock()  # one sync, load or unload at a time
        self._pinned_unloaded: set[str] = set()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._refused: dict[tuple[str, int], tuple] = {}  # FAILED version -> folder fingerprint
        self.syncs = 0  # completed `sync` passes (tests wait on it instead of sleeping)

    def model_names(self) -> list[str]:
        """Names of the models the repository holds now."""
        return sorted({found.name for found in scan_repository(self.root)})

    def sync(self) -> None:
        """Bring every model (except explicitly unloaded ones) in line with the repository."""
        with self._lock:
            found = scan_repository(self.root)
            names = {v.name for v in found} | set(self.registry.names())
            for name in sorted(names - self._pinned_unloaded):
                self._sync_model(name, [v for v in found if v.name == name], retry_failed=False)
            self.syncs += 1

    def load_model(self, name: str) -> None:
        """Load `name`'s new versions, retry its failed ones, unload its removed ones.

        Raises `NotFound` if the repository has no such model and `Unavailable` if none of
        its versions could be loaded.
        """
        with self._lock:
            found = [v for v in scan_repository(self.root) if v.name == name]
            if not found:
                raise NotFound(
                    f"model_name: expected a model of the repository "
                    f"({', '.join(self.model_names()) or 'empty'}), got {excerpt(name)}"
                )
            self._pinned_unloaded.discard(name)
            self._sync_model(name, found, retry_failed=True)
            if not self.registry.is_ready(name):
                reasons = "; ".join(
                    f"version {s.version}: {s.reason}"
                    for s in self.registry.statuses(name)
                    if s.reason
                )
                raise Unavailable(f"model {name!r}: no version could be loaded ({reasons})")

    def unload_model(self, name: str) -> None:
        """Stop serving every version of `name`; returns when their queues have drained."""
        with self._lock:
            loaded = [m.version for m in self.registry if m.name == name]
            if not loaded and name not in self.registry.names():
                raise NotFound(
                    f"model_name: expected a loaded model "
                    f"({', '.join(self.registry.names()) or 'none'}), got {excerpt(name)}"
                )
            self._pinned_unloaded.add(name)
            for version in loaded:
                self._unload(name, version)

    def start_polling(self, interval: float) -> None:
        """Run `sync` every `interval` seconds in a daemon thread until `stop_polling`."""
        if interval <= 0:
            raise ValueError(f"poll interval: expected > 0 seconds, got {interval}")
        self._stop.clear()
        self._poller = threading.Thread(
            target=self._poll, args=(interval,), name="repository-poller", daemon=True
        )
        self._poller.start()

    def stop_polling(self) -> None:
        """Stop the polling thread (a sync under way finishes first)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.sync()
            except RepositoryError as exc:  # e.g. the repository folder vanished for a moment
                log.error("repository_poll_failed", extra={"reason": str(exc)})

    def _sync_model(self, name: str, found: list[ModelVersion], retry_failed: bool) -> None:
        """Load the versions of `name` in `found` that are new (or FAILED and changed since, or
        all FAILED ones with `retry_failed`); unload or forget the ones not in it."""
        states = {s.version: s.state for s in self.registry.statuses(name)}
        on_disk = {v.version for v in found}
        for scanned in found:
            key, state = (name, scanned.version), states.get(scanned.version)
            changed = self._refused.get(key) != scanned.fingerprint
            if state is None or (state == ModelState.FAILED and (retry_failed or changed)):
                if self.registry.load(scanned).state == ModelState.FAILED:
                    self._refused[key] = scanned.fingerprint
                else:
                    self._refused.pop(key, None)
        for version, state in states.items():
            if version in on_disk:
                continue
            if state == ModelState.READY:
                self._unload(name, version)
            elif state == ModelState.FAILED:
                self.registry.forget(name, version)
                self._refused.pop((name, version), None)

    def _unload(self, name: str, version: int) -> None:
        if not self.registry.unload(name, version, self.drain_timeout):
            log.warning(
                "model_drain_timeout",
                extra={"model": name, "version": version, "timeout_s": self.drain_timeout},
            )
