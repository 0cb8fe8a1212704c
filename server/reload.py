"""Hot reload: keep the registry in step with the model repository while serving.

`RepositoryReloader.sync` compares what `scan_repository` finds with what the registry holds:
new versions are loaded (warmed up before they turn READY, so "latest" moves only then),
versions whose folder disappeared are unloaded (no new requests; queued ones finish), except
the one "latest" points at, which keeps serving (logged) until a newer one is READY: "latest"
never steps back to an older version by itself (`ModelRegistry.reset_latest`; an explicit
unload or load does). A READY version whose files changed (size, mtime or inode of
model.onnx or model.json) is verified again and replaced by what is on disk now, or, if that
is refused, stops serving and turns FAILED with the reason. A scan that finds no version at all
(an emptied or unreadable repository) changes nothing and is logged. A version
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
from aet.server.models import ModelRegistry, ModelState, VersionStatus

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
        self._served: dict[tuple[str, int], tuple] = {}  # READY version -> folder fingerprint
        self._missing: set[tuple[str, int]] = set()  # latest versions kept though their folder went
        self.syncs = 0  # completed `sync` passes (tests wait on it instead of sleeping)

    def model_names(self) -> list[str]:
        """Names of the models the repository holds now."""
        return sorted({found.name for found in scan_repository(self.root)})

    def sync(self) -> None:
        """Bring every model (except explicitly unloaded ones) in line with the repository."""
        with self._lock:
            found = scan_repository(self.root)
            if not found and any(True for _ in self.registry):
                log.error(
                    "repository_poll_failed",
                    extra={"reason": "the repository holds no version; serving what is loaded"},
                )
                self.syncs += 1
                return
            names = {v.name for v in found} | set(self.registry.names())
            for name in sorted(names - self._pinned_unloaded):
                self._sync_model(name, [v for v in found if v.name == name], explicit=False)
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
            self._sync_model(name, found, explicit=True)
            self.registry.reset_latest(name)
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
            self.registry.reset_latest(name)

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
            except (RepositoryError, OSError) as exc:  # e.g. the folder vanished for a moment
                log.error("repository_poll_failed", extra={"reason": str(exc)})

    def _sync_model(self, name: str, found: list[ModelVersion], explicit: bool) -> None:
        """Load the versions of `name` in `found` that are new (or FAILED and changed since, or
        all FAILED ones when `explicit`), reload READY ones whose files changed; unload or
        forget the ones not in it (the latest only when `explicit`)."""
        states = {s.version: s.state for s in self.registry.statuses(name)}
        on_disk = {v.version for v in found}
        for scanned in found:
            key, state = (name, scanned.version), states.get(scanned.version)
            self._missing.discard(key)
            if state == ModelState.READY:
                served = self._served.setdefault(key, scanned.fingerprint)
                if served != scanned.fingerprint:
                    log.warning("model_changed", extra={"model": name, "version": key[1]})
                    self._record(scanned, self.registry.load(scanned, True, self.drain_timeout))
                continue
            changed = self._refused.get(key) != scanned.fingerprint
            if state is None or (state == ModelState.FAILED and (explicit or changed)):
                self._record(scanned, self.registry.load(scanned))
        latest = self.registry.latest_version(name)
        for version, state in states.items():
            if version in on_disk:
                continue
            if state == ModelState.READY and version == latest and not explicit:
                if (name, version) not in self._missing:
                    self._missing.add((name, version))
                    log.warning("model_folder_missing", extra={"model": name, "version": version})
            elif state == ModelState.READY:
                self._unload(name, version, step_back=explicit)
            elif state == ModelState.FAILED:
                self.registry.forget(name, version)
                self._refused.pop((name, version), None)

    def _record(self, scanned: ModelVersion, status: VersionStatus) -> None:
        """Remember the folder fingerprint of a version just loaded or refused."""
        key = (scanned.name, scanned.version)
        if status.state == ModelState.FAILED:
            self._refused[key] = scanned.fingerprint
            self._served.pop(key, None)
        else:
            self._served[key] = scanned.fingerprint
            self._refused.pop(key, None)

    def _unload(self, name: str, version: int, step_back: bool = False) -> None:
        self._served.pop((name, version), None)
        self._missing.discard((name, version))
        if not self.registry.unload(name, version, self.drain_timeout, step_back):
            log.warning(
                "model_drain_timeout",
                extra={"model": name, "version": version, "timeout_s": self.drain_timeout},
            )
