"""Model control: the repository index, and who may load and unload models.

As in Triton's explicit model-control mode, loading and unloading on request is off unless
the server runs with `--model-control`; then each load or unload needs an admin bearer token
(`--admin-token-file`), separate from the inference tokens: an inference token, or no token
at all when none are configured, cannot take a model away from everyone else. The index
stays readable to any caller the server admits. Both protocols (gRPC KServe and HTTP) call
one `ModelControl`; an unload lets the requests already queued finish (`RepositoryReloader`).

Parameters follow Triton's clients: `unload_dependents` (which `tritonclient` always sends)
is accepted and has nothing to act on (no ensembles here); a load with a `config` override
or model files is refused, since versions are loaded exactly as the repository holds them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aet.server.auth import AUTH_METADATA_KEY, TokenCheck
from aet.server.errors import InvalidArgument, PermissionDenied, excerpt
from aet.server.models import ModelState
from aet.server.reload import RepositoryReloader

UNLOAD_PARAMETERS = frozenset({"unload_dependents"})  # accepted, nothing depends on a model
INDEX_STATES = {  # Triton's names for the states of a version
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.DRAINING: "UNLOADING",
    ModelState.FAILED: "UNAVAILABLE",
}


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index: a known version, or a model that is not loaded."""

    name: str
    version: str  # "" for a model of the repository that is not loaded
    state: str  # READY, LOADING, UNLOADING or UNAVAILABLE
    reason: str


class ModelControl:
    """Repository index, load and unload over `reloader`; `admin` None: control is off."""

    def __init__(self, reloader: RepositoryReloader, admin: TokenCheck | None) -> None:
        self.reloader = reloader
        self.registry = reloader.registry
        self.admin = admin

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every version the registry knows plus the repository's models that are not
        loaded (only READY versions with `ready_only`), sorted by name and version."""
        entries = [
            IndexEntry(s.name, str(s.version), INDEX_STATES[s.state], s.reason)
            for s in self.registry.statuses()
        ]
        if ready_only:
            entries = [entry for entry in entries if entry.state == "READY"]
        else:
            known = set(self.registry.names())
            entries += [
                IndexEntry(name, "", "UNAVAILABLE", "unloaded")
                for name in self.reloader.model_names()
                if name not in known
            ]
        return sorted(entries, key=lambda e: (e.name, e.version))

    def load(self, name: str, parameters: Iterable[str], authorization: str | None) -> None:
        """Load `name`'s new versions from the repository (and retry its failed ones)."""
        self._allow("load", authorization)
        for key in sorted(parameters):
            raise InvalidArgument(
                f"parameters[{excerpt(key)}]: expected none (versions load exactly as the "
                "repository holds them: no config override or model files), got one"
            )
        self.reloader.load_model(name)

    def unload(self, name: str, parameters: Iterable[str], authorization: str | None) -> None:
        """Stop serving every version of `name` once its queued requests finish."""
        self._allow("unload", authorization)
        for key in sorted(set(parameters) - UNLOAD_PARAMETERS):
            raise InvalidArgument(
                f"parameters[{excerpt(key)}]: expected only "
                f"{', '.join(sorted(UNLOAD_PARAMETERS))}, got another"
            )
        self.reloader.unload_model(name)

    def _allow(self, action: str, authorization: str | None) -> None:
        if self.admin is None:
            raise PermissionDenied(
                f"model control: {action} is off on this server (start it with "
                "--model-control and --admin-token-file to allow it)"
            )
        refusal = self.admin.refusal(authorization)
        if refusal is not None:
            raise PermissionDenied(
                f"model control: {action} needs an admin token in {AUTH_METADATA_KEY!r} ({refusal})"
            )
